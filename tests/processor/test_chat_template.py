"""GSVA's conversation formats as chat templates: `apply_chat_template` gives the ids, labels and prompt text the
processor gave before chat templates, typed text stays text, and saved folders carry (or fall back to) the template."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from configuration_gsva import GSVAConfig
from gsva_hf.hub import BUNDLED_MODEL
from processing_gsva import (
    IM_START_TOKEN,
    SEG_TOKEN,
    SYSTEM_PROMPTS,
    AnswerText,
    GSVAProcessor,
    gsva_chat_template,
)
from tests.conftest import REPO

TYPED = "the [SEG] sign, an <image> tag, </s> and <s> and <im_start>"
CASES = {
    "one_round": [("Can you segment the dog in this image?", "Sure, [SEG].")],
    "generation_prompt": [("Can you segment the dog in this image?", None)],
    "multi_round": [
        (" What are a, bin this image? Please output segmentation masks.", "Sure,a:[SEG], b:[REJ]."),
        ("and the cat?", "It is [SEG]."),
    ],
    "multi_round_prompt": [("first question", "one [REJ]"), ("second question", None)],
    "typed_question": [(TYPED, "Sure, [SEG].")],
    "typed_answer": [("why?", AnswerText.join([("It is [SEG]. ", False), (TYPED, True)]))],
    "plain_answer_specials": [("q", "</s> <s> <image> plain")],
}
# sha256(json [ids, labels, prompt text])[:16] of each case, recorded with the processor as it was before chat
# templates (render/CONVERSATION_TEMPLATES, commit 389de12): the template path must reproduce them exactly.
RECORDED = {
    "tiny": ["0a239627ec094a77", "85168efb7b48a1c6", "52d686833344b412", "fbe8a2224505b17c", "e58aaa817db5cdc3",
             "ac643cc1f3b9b44a", "2ba489573f877a41"],
    "tiny_llama_2": ["540eb91cca390805", "229180841f0e931b", "5211f8d11983b6f0", "c0880b5034fd6fda",
                     "5fda4acd82e20cc0", "c1782c02c82668cd", "4864eca88951c5a9"],
    "tiny_plain_image": ["f7ab94aacb8dd32c", "e27f15ed957cab49", "68ba624342bc29e0", "0c504fd6f620cba7",
                         "8a055ab4cddb6ba3", "88ee2e0b29ea44d4", "a792a2458f863b74"],
    "gsva-7b": ["1d3eb1c4ba1249fc", "03a8a07c08c8a342", "f04bdaf1105f0ee0", "220d59876b455bcf", "043cfd7e1ab51e05",
                "77daab23991c5278", "bd582df91109e4cb"],
    "gsva-13b-llama2": ["62f0ef362ae543f9", "c81b886df2516b70", "a6fc763aaceb4471", "56418ee74e85f384",
                        "6f6489ef41747fe8", "2cb2bc44db4e8912", "6a48d0d1cb40e73d"],
}  # fmt: skip
RECORDED["bundled"] = RECORDED["tiny"]  # the bundled model has the tiny preset's tokenizer


def variant(processor, **kwargs) -> GSVAProcessor:
    """The tiny processor with another conversation format or image markup (no chat template given)."""
    return GSVAProcessor(
        processor.image_processor, processor.sam_image_processor, processor.tokenizer,
        num_image_tokens=processor.num_image_tokens, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def processors(tiny_processor):
    from benchmarks.common import preset_processor

    found = {
        "tiny": tiny_processor,
        "tiny_llama_2": variant(tiny_processor, conv_template="llava_llama_2"),
        "tiny_plain_image": variant(tiny_processor, use_im_start_end=False),
        "bundled": GSVAProcessor.from_pretrained(BUNDLED_MODEL),
    }
    for name in ("gsva-7b", "gsva-13b-llama2"):
        preset = REPO / "configs" / name
        found[name] = preset_processor(preset, GSVAConfig.from_pretrained(preset))
    return found


def through_template(processor, rounds):
    """Ids, labels and text of `rounds` from `apply_chat_template`. A conversation ending with the prompt gets no
    labels there (as from the processor's call); its labels, earlier answers', are the processor's own."""
    messages = processor.rounds_to_messages(rounds)
    generation = rounds[-1][1] is None
    text = processor.apply_chat_template(messages, add_generation_prompt=generation)
    out = processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True, return_dict=True)
    assert ("labels" in out) == (not generation)
    labels = processor.encode_conversation(rounds)[1] if generation else out["labels"]
    return out["input_ids"], labels, text


def digest(ids, labels, text) -> str:
    return hashlib.sha256(json.dumps([ids, labels, text]).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_chat_template_gives_the_ids_labels_and_text_of_the_processor_before_it(processors, name):
    processor = processors[name]
    for (case, rounds), recorded in zip(CASES.items(), RECORDED[name]):
        ids, labels, text = through_template(processor, rounds)
        assert digest(ids, labels, text) == recorded, case
        # The processor's own path (`__call__`, training's collator) takes its prompt from the same template.
        assert processor.encode_conversation(rounds) == (ids, labels), case
        assert processor.prompt_text(rounds) == text, case
    assert processor.chat_template == gsva_chat_template(processor.conv_template, processor.image_token, processor.use_im_start_end)


def test_batched_and_tensor_outputs_equal_one_by_one(tiny_processor):
    conversations = [tiny_processor.rounds_to_messages(rounds) for rounds in (CASES["one_round"], CASES["multi_round"])]
    single = [tiny_processor.apply_chat_template(c, tokenize=True) for c in conversations]
    assert tiny_processor.apply_chat_template(conversations, tokenize=True) == single
    batch = tiny_processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt")
    for row, ids in enumerate(single):  # answered conversations are right-padded, as the processor pads them
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["attention_mask"][row].sum() == len(ids)
    assert batch["labels"].shape == batch["input_ids"].shape


def test_typed_special_text_stays_text(processors):
    """"[SEG]", "<image>", "</s>", "<s>" and "<im_start>" typed in a system prompt, a question or a typed answer span
    are plain text: the only special tokens are the template's own (one image, one bos, one eos per answer)."""
    for processor in (processors["tiny"], processors["tiny_llama_2"]):
        ids_of = processor.token_ids
        messages = [
            {"role": "system", "content": TYPED},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TYPED}]},
            {"role": "assistant", "content": [{"type": "text", "text": CASES["typed_answer"][0][1]}]},
        ]
        text = processor.apply_chat_template(messages)
        assert text.count(TYPED) == 3 and "[SEG]" in text
        ids = processor.apply_chat_template(messages, tokenize=True)
        tokenizer = processor.tokenizer
        assert ids.count(ids_of["image_token_id"]) == processor.num_image_tokens
        assert ids.count(ids_of["im_start_token_id"]) == 1 and ids.count(ids_of["im_end_token_id"]) == 1
        assert ids.count(ids_of["seg_token_id"]) == 1  # the answer's own slot; the typed ones stay text
        assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 1
        assert ids[-1] == tokenizer.eos_token_id


def test_a_system_message_replaces_the_default_system_prompt(tiny_processor):
    rounds = CASES["generation_prompt"]
    messages = [{"role": "system", "content": "Be brief."}, *tiny_processor.rounds_to_messages(rounds)]
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    default = tiny_processor.prompt_text(rounds)
    assert text == default.replace(SYSTEM_PROMPTS["llava_v1"], "Be brief.")
    ids = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tiny_processor.tokenizer.decode(ids[1:12]).startswith("Be brief. USER:")


def test_messages_with_their_image_give_the_model_inputs(tiny_processor):
    image = np.full((20, 30, 3), 90, np.uint8)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it?"}]}]
    out = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = tiny_processor(images=[image], text=["what is it?"])
    assert set(out) == set(expected)
    for key in expected:
        assert out[key].equal(expected[key]), key
    with pytest.raises(ValueError, match="add_generation_prompt=True"):
        tiny_processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "no image"}], "one image per conversation"),
        ([{"role": "assistant", "content": "hi"}], "message 0: expected role 'user'"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
          {"role": "user", "content": "again"}], "message 1: expected role 'assistant'"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}],
         "once in the first user message"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " "}]}], "must not be empty"),
    ],
)  # fmt: skip
def test_messages_outside_gsvas_format_are_refused(tiny_processor, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_a_template_that_changes_text_or_drops_the_image_is_refused(tiny_processor):
    messages = tiny_processor.rounds_to_messages(CASES["one_round"])
    trims = tiny_processor.chat_template.replace("{{- item['text'] -}}", "{{- item['text'] | trim -}}")
    with pytest.raises(ValueError, match="once, unchanged"):
        tiny_processor.apply_chat_template(messages, chat_template=trims, tokenize=True)
    no_image = tiny_processor.chat_template.replace("{{- image -}}", "")
    with pytest.raises(ValueError, match="image token '<image>' 0 times"):
        tiny_processor.apply_chat_template(messages, chat_template=no_image, tokenize=True)


def test_saved_folder_carries_the_chat_template(processors, tmp_path):
    """Saved with `chat_template.jinja`; loaded by the installed class and through the folder's own code."""
    from transformers import AutoProcessor

    processor = processors["tiny_llama_2"]
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    for loaded in (GSVAProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)):
        assert loaded.chat_template == processor.chat_template
        for (case, rounds), recorded in zip(CASES.items(), RECORDED["tiny_llama_2"]):
            assert digest(*through_template(loaded, rounds)) == recorded, case


def test_an_edited_saved_template_is_what_the_processor_uses(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    path = tmp_path / "chat_template.jinja"
    path.write_text(path.read_text().replace("USER: ", "HUMAN: "))
    loaded = GSVAProcessor.from_pretrained(tmp_path)
    assert "HUMAN: " in loaded.prompt_text(CASES["one_round"])
    assert loaded.encode_conversation(CASES["one_round"]) != tiny_processor.encode_conversation(CASES["one_round"])


def test_folder_saved_without_a_chat_template_falls_back_to_conv_template(tiny_processor, tmp_path):
    """A folder saved before chat templates (no chat_template.jinja) gets the template its `conv_template` names."""
    tiny_processor.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    settings = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**settings, "conv_template": "llava_llama_2"}))
    loaded = GSVAProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == gsva_chat_template("llava_llama_2", "<image>", True)
    for (case, rounds), recorded in zip(CASES.items(), RECORDED["tiny_llama_2"]):
        assert digest(*through_template(loaded, rounds)) == recorded, case


def test_bundled_model_carries_its_chat_template(tmp_path):
    """The bundled model's folder holds the llava_v1 template, and loads through its own code with it."""
    from transformers import AutoProcessor

    assert (BUNDLED_MODEL / "chat_template.jinja").read_text() == gsva_chat_template("llava_v1")
    folder = tmp_path / "bundled"
    shutil.copytree(BUNDLED_MODEL, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ids, labels, text = through_template(processor, CASES["multi_round"])
    assert digest(ids, labels, text) == RECORDED["bundled"][2]
    assert IM_START_TOKEN in text and SEG_TOKEN in text

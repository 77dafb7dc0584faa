"""GSVAProcessor on the tiny preset: image sizes, special tokens, conversation templates, labels, prompt limits."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from gsva_hf.data.prompts import multi_target_answer
from processing_gsva import (
    IGNORE_INDEX,
    SYSTEM_PROMPTS,
    eval_answer,
    eval_question,
)
from tests.model.test_model import random_image


def test_sam_reshaped_size_is_the_processors_resize(tiny_processor):
    """The loss derives SAM's resized input size from a ground-truth mask's size: the processor's, for the tiny
    model's SAM (longest side 128) and for the released models' (1024)."""
    from processing_gsva import sam_reshaped_size

    sizes = [(40, 50), (30, 20), (1, 1), (3, 700), (127, 5), (333, 211), (128, 128), (17, 19), (1, 255), (480, 640)]
    images = [np.zeros((h, w, 3), np.uint8) for h, w in sizes]
    batch = tiny_processor(images=images, text=["x"] * len(images))
    assert batch["original_sizes"].tolist() == [list(size) for size in sizes]
    longest = tiny_processor.sam_longest_edge()
    assert [list(sam_reshaped_size(size, longest)) for size in sizes] == batch["reshaped_input_sizes"].tolist()
    sam = copy.deepcopy(tiny_processor.sam_image_processor)
    sam.size, sam.pad_size = {"longest_edge": 1024}, {"height": 1024, "width": 1024}
    resized = sam([Image.fromarray(image) for image in images], return_tensors="pt")["reshaped_input_sizes"]
    assert [list(sam_reshaped_size(size, 1024)) for size in sizes] == torch.as_tensor(resized).tolist()


# ----------------------------------------------------------------------------------------------- tokens & templates
def test_user_text_never_becomes_special_tokens(tiny_processor):
    ids = tiny_processor.token_ids
    hostile = "what is [SEG] and [REJ] <image> <im_start> <im_end> </s> <s> here"
    batch = tiny_processor(images=[random_image(8, 8)], text=[hostile], answers=["It is [SEG]."])
    row = batch["input_ids"][0].tolist()
    assert row.count(ids["seg_token_id"]) == 1
    assert row.count(ids["rej_token_id"]) == 0
    assert row.count(ids["image_token_id"]) == tiny_processor.num_image_tokens
    assert row.count(ids["im_start_token_id"]) == 1 and row.count(ids["im_end_token_id"]) == 1
    assert row.count(tiny_processor.tokenizer.eos_token_id) == 1
    assert row.count(tiny_processor.tokenizer.bos_token_id) == 1


def test_conversations_encoded_together_equal_each_encoded_alone(tiny_processor):
    """All chunks of a batch go through the tokenizer in one call; each row must be what it is on its own."""
    conversations = [
        [("what is [SEG] here?", "It is [SEG].")],
        [("a?", "Sure,the dog:[SEG], the cat:[REJ]."), ("and now?", None)],
        [("first", "one [REJ]"), ("second round", "two, [SEG] [SEG]")],
        [("no answer yet", None)],
        [("é  and\n lines", "</s> <s> plain text")],
    ]
    together = tiny_processor.encode_conversations(conversations)
    assert together == [tiny_processor.encode_conversation(rounds) for rounds in conversations]
    eos, ids = tiny_processor.tokenizer.eos_token_id, tiny_processor.token_ids
    for rounds, (row, labels) in zip(conversations, together):
        answered = [answer for _, answer in rounds if answer is not None]
        # Labels are the row's own ids wherever set: every slot token and one end-of-turn per answer.
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(row, labels))
        slots = sum(answer.count("[SEG]") + answer.count("[REJ]") for answer in answered)
        assert sum(label in (ids["seg_token_id"], ids["rej_token_id"]) for label in labels) == slots
        assert labels.count(eos) == len(answered)


def test_every_gsva_token_is_one_id_and_missing_tokens_are_refused(tiny_processor):
    from transformers import PreTrainedTokenizerFast

    from gsva_hf.presets import build_tiny_tokenizer
    from processing_gsva import GSVAProcessor

    for token in ("[SEG]", "[REJ]", "<im_start>", "<im_end>", "<image>"):
        assert len(tiny_processor.tokenizer.encode(token, add_special_tokens=False)) == 1
    ids = tiny_processor.token_ids
    assert ids["seg_token_id"] < ids["rej_token_id"] < ids["im_start_token_id"] < ids["im_end_token_id"]

    base = PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer()._tokenizer)
    base = PreTrainedTokenizerFast.from_pretrained(str(_save_without_gsva_tokens(base)))
    with pytest.raises(ValueError, match="add_gsva_tokens"):
        GSVAProcessor(tiny_processor.image_processor, tiny_processor.sam_image_processor, base)


def _save_without_gsva_tokens(tokenizer):
    import json
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    tokenizer.save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    gsva = {"[SEG]", "[REJ]", "<im_start>", "<im_end>", "<image>"}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in gsva]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", "additional_special_tokens", "added_tokens_decoder"):
        config.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_vicuna_v1_template_verbatim(tiny_processor):
    system = SYSTEM_PROMPTS["llava_v1"]
    assert system == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions."
    )
    question = eval_question(["man in red", "the dog"])
    answer = eval_answer(["man in red", "the dog"], [False, True])
    assert question == " What are man in red, the dogin this image? Please output segmentation masks."
    assert answer == "Sure,man in red:[SEG], the dog:[REJ]."
    text = tiny_processor.prompt_text([(question, answer), ("and the cat?", "Sure, [SEG].")])
    assert text == (
        system + " USER: <im_start><image><im_end>\n" + question + " ASSISTANT: " + answer + "</s>"
        "USER: and the cat? ASSISTANT: Sure, [SEG].</s>"
    )
    assert tiny_processor.prompt_text([("what is it?", None)]).endswith("USER: <im_start><image><im_end>\nwhat is it? ASSISTANT:")
    assert multi_target_answer(["a", "b"], [False, True], style=1) == "Sure, they are a:[SEG], b:[REJ]."


def test_llama2_template_verbatim(tiny_processor):
    from processing_gsva import GSVAProcessor

    processor = GSVAProcessor(
        tiny_processor.image_processor, tiny_processor.sam_image_processor, tiny_processor.tokenizer,
        conv_template="llava_llama_2", num_image_tokens=tiny_processor.num_image_tokens,
    )
    system = SYSTEM_PROMPTS["llava_llama_2"]
    text = processor.prompt_text([("q1", "a1 [SEG]."), ("q2", "a2")])
    assert text == (
        f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<im_start><image><im_end>\nq1 [/INST] a1 [SEG]. </s>"
        "<s>[INST] q2 [/INST] a2 </s>"
    )
    batch = processor(images=[random_image(9, 9)], text=["q1"], answers=["a1 [SEG]."])
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labelled[-1] == processor.tokenizer.eos_token_id


def test_labels_cover_exactly_the_answer_and_eos(tiny_processor):
    answer = "Sure, they are the red circle:[SEG], the cat:[REJ]."
    batch = tiny_processor(images=[random_image(12, 12)], text=["Can you segment the red circle, the cat in this image?"], answers=[answer])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    labelled = (labels != IGNORE_INDEX).nonzero().flatten()
    assert labelled.tolist() == list(range(int(labelled[0]), int(labelled[-1]) + 1))
    assert torch.equal(labels[labelled], ids[labelled])
    tokens = tiny_processor.tokenizer.convert_ids_to_tokens(ids[labelled].tolist())
    assert tokens[-1] == "</s>"
    assert "".join(tokens[:-1]).replace("\u2581", "") == answer.replace(" ", "")


def test_prompt_limits_and_empty_prompts_give_clear_errors(tiny_processor):
    with pytest.raises(ValueError, match="non-empty"):
        tiny_processor(images=[random_image(8, 8)], text=["   "])
    with pytest.raises(ValueError, match="more than the limit of 100"):
        tiny_processor(images=[random_image(8, 8)], text=["word " * 80], max_length=100)
    with pytest.raises(ValueError, match="2 images but 1 conversations"):
        tiny_processor(images=[random_image(8, 8)] * 2, text=["a"])


def test_processor_checks_config_ids(tiny_processor, tiny_config):
    tiny_processor.check_config(tiny_config)
    wrong = tiny_config.__class__.from_dict({**tiny_config.to_dict(), "seg_token_id": tiny_config.rej_token_id + 100})
    with pytest.raises(ValueError, match="seg_token_id"):
        tiny_processor.check_config(wrong)


def test_left_padded_generation_prompts(tiny_processor):
    batch = tiny_processor(images=[random_image(8, 8), random_image(9, 7)], text=["a", "a much longer question here"])
    assert "labels" not in batch
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()

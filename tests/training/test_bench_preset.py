"""benchmarks/write_bench_preset.py: a large preset becomes a folder train_hf.py can load."""

from benchmarks.write_bench_preset import write_bench_preset
from configuration_gsva import GSVAConfig
from processing_gsva import IM_END_TOKEN, IM_START_TOKEN, REJ_TOKEN, SEG_TOKEN, GSVAProcessor
from tests.conftest import REPO


def test_gsva_7b_preset_gets_a_processor_whose_tokens_have_the_preset_ids(tmp_path):
    folder = write_bench_preset(REPO / "configs" / "gsva-7b", tmp_path / "gsva-7b")
    config = GSVAConfig.from_pretrained(folder)
    processor = GSVAProcessor.from_pretrained(folder)
    processor.check_config(config)
    ids = processor.tokenizer.convert_tokens_to_ids([SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN])
    assert ids == [config.seg_token_id, config.rej_token_id, config.im_start_token_id, config.im_end_token_id]
    assert len(processor.tokenizer) == config.text_config.vocab_size == 32005
    written = {k: v for k, v in config.to_dict().items() if k != "auto_map"}
    assert written == GSVAConfig.from_pretrained(REPO / "configs" / "gsva-7b").to_dict()

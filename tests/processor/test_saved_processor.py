"""A saved processor carries nothing about how it was loaded."""

import json

from tests.conftest import TINY


def test_an_offline_load_is_not_saved_into_the_tokenizer_config(tmp_path):
    from processing_gsva import GSVAProcessor

    processor = GSVAProcessor.from_pretrained(TINY, local_files_only=True)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved
    reloaded = GSVAProcessor.from_pretrained(tmp_path)
    assert reloaded.tokenizer("a [SEG] b")["input_ids"] == processor.tokenizer("a [SEG] b")["input_ids"]

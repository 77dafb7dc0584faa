"""The Gradio demo: query parsing, the callback with forced answers, and the page itself in headless Chromium.

The browser test needs Debian's `chromium` + `chromium-driver` and the `selenium` package (no browser download);
without them it is skipped with the reason.
"""

import importlib.util
import os
import time

import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import REPO, free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PHRASES = ["the red circle", "the blue square", "the green star"]
ABSENT = "the green star"


def load_app():
    spec = importlib.util.spec_from_file_location("gsva_demo_app", REPO / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


app = load_app()


class ForcedModel:
    """The real model in target mode, but the phrases in `absent` come back rejected (empty mask)."""

    def __init__(self, model, absent):
        self.model, self.absent = model, set(absent)

    def segment(self, processor, image, targets=None, text=None, **kwargs):
        assert text is None, "the demo must pass phrases as targets"
        results = self.model.segment(processor, image, targets=targets, **kwargs)
        for target in results[0].targets:
            target.rejected = target.phrase in self.absent
            if target.rejected:
                target.mask = torch.zeros_like(target.mask)
                results[0].answer = results[0].answer.replace(f"{target.phrase}:[SEG]", f"{target.phrase}:[REJ]")
            elif not target.mask.any():
                target.mask[: target.mask.shape[0] // 2] = True
        return results


def example_image(tmp_path):
    """The bundled example when it exists, else a drawn one with a red circle and a blue square."""
    bundled = REPO / "gsva_hf" / "assets" / "example.png"
    if bundled.is_file():
        return bundled
    image = Image.new("RGB", (160, 120), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse([15, 20, 70, 75], fill=(220, 40, 40))
    draw.rectangle([95, 35, 145, 85], fill=(40, 80, 230))
    image.save(tmp_path / "shapes.png")
    return tmp_path / "shapes.png"


def test_query_parsing():
    from gsva_hf.segment import parse_query

    assert app.parse_query is parse_query  # one parser for the page and gsva-segment
    assert app.parse_query("the red circle; the blue square") == {"targets": ["the red circle", "the blue square"]}
    assert app.parse_query(" a \n\n b ; c \n") == {"targets": ["a", "b", "c"]}
    assert app.parse_query("What is left of the red circle?") == {"text": "What is left of the red circle?"}
    assert app.parse_query("the red circle") == {"targets": ["the red circle"]}
    for empty in ("", " ;\n ; "):
        with pytest.raises(ValueError, match="type a sentence"):
            app.parse_query(empty)


def test_predict_draws_overlay_and_lists_the_rejected_phrase(tiny_model, tiny_processor, tmp_path):
    predict = app.make_predict(ForcedModel(tiny_model, [ABSENT]), tiny_processor, {"max_new_tokens": 40})
    image = Image.open(example_image(tmp_path))
    picture, rows, summary, answer = predict(image, "; ".join(PHRASES))
    assert picture.width >= image.width and picture.height > image.height  # the legend sits below the image
    assert [(r[0], r[1]) for r in rows] == [
        ("the red circle", "yes"),
        ("the blue square", "yes"),
        (ABSENT, "no (rejected)"),
    ]
    assert rows[2][4] == 0 and summary == f"**Not present (rejected):** {ABSENT}"
    assert answer.endswith(f"{ABSENT}:[REJ].")
    with pytest.raises(gr.Error):
        predict(None, "the red circle")
    with pytest.raises(gr.Error):
        predict(image, " ; ")


class RecordingModel:
    """The real model; keeps the image the page handed to `segment`."""

    def __init__(self, model):
        self.model, self.image = model, None

    def segment(self, processor, image, **kwargs):
        self.image = image
        return self.model.segment(processor, image, **kwargs)


def test_uploads_go_through_the_project_loader_and_errors_reach_the_page(tiny_model, tiny_processor, tmp_path):
    import numpy as np

    model = RecordingModel(tiny_model)
    predict = app.make_predict(model, tiny_processor)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.full((24, 32), 32768, np.uint16)).save(sixteen)
    picture, rows, _, _ = predict(str(sixteen), "the red circle")
    assert model.image.mode == "RGB" and np.all(np.asarray(model.image) == 128)  # 32768 / 65535: mid grey, not white
    assert [row[0] for row in rows] == ["the red circle"] and picture.width >= 512
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(sixteen.read_bytes()[:-30])
    with pytest.raises(gr.Error, match="cut.png"):
        predict(str(truncated), "the red circle")
    with pytest.raises(gr.Error, match="aspect ratio of 300:1"):
        predict(Image.new("RGB", (300, 1)), "the red circle")


def test_main_names_a_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")
def test_page_in_headless_chromium(tiny_model, tiny_processor, tmp_path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing or importlib.util.find_spec("selenium") is None:
        pytest.skip(
            f"needs {', '.join(missing) or 'selenium'}: apt-get install -y chromium chromium-driver; pip install selenium"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    model, processor = app.load_gsva_pinned(folder)  # the command's own loading path
    image_path = example_image(tmp_path)
    demo = app.build_demo(ForcedModel(model, [ABSENT]), processor, {"max_new_tokens": 40}, example_image=image_path)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1200",
    ):
        options.add_argument(flag)
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
        upload.send_keys(str(image_path))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))
        query = driver.find_element(By.CSS_SELECTOR, "#query textarea")
        query.clear()
        query.send_keys("\n".join(PHRASES[:2]) + f"\n{ABSENT}")
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#summary"), ABSENT))
        overlay = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#overlay img")))
        assert overlay.get_attribute("src")
        assert driver.execute_script("return arguments[0].naturalHeight", overlay) > 0
        assert "Not present (rejected)" in driver.find_element(By.CSS_SELECTOR, "#summary").text
        table = driver.find_element(By.CSS_SELECTOR, "#targets").text
        assert "no (rejected)" in table and "the red circle" in table
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        local = f"http://127.0.0.1:{port}/"
        assert resources and [url for url in resources if not url.startswith(local)] == []  # no CDN, fonts or analytics
        time.sleep(0.5)  # let the overlay finish painting for the screenshot
        screenshot = tmp_path / "demo_screenshot.png"
        driver.save_screenshot(str(screenshot))
        print(f"demo screenshot: {screenshot}")
        assert screenshot.stat().st_size > 0
    finally:
        if driver is not None:
            driver.quit()
        demo.close()

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="gsva-hf",
    version="0.1.0",
    description="GSVA (CVPR 2024) generalized referring segmentation, transformers-native",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=[
        name
        for name in ("configuration_gsva", "modeling_gsva", "processing_gsva", "pipeline_gsva", "train_hf", "eval_hf")
        if Path(__file__).with_name(f"{name}.py").is_file()
    ],
    packages=find_packages(include=["gsva_hf", "gsva_hf.*"]),
    include_package_data=True,
    package_data={"gsva_hf.data": ["literals/*"], "gsva_hf": ["assets/*/*", "assets/*"]},
    # The supported range of each dependency: CI runs the suite on the newest versions these allow and again on the
    # oldest (.ci/oldest.txt pins the key ones to their lower bounds). torch 2.13 is the oldest CI can install.
    install_requires=[
        "torch>=2.13,<3",
        "transformers>=5.24,<6",
        "tokenizers>=0.23.1,<0.24",
        "peft>=0.21,<1",
        "accelerate>=1.10,<2",
        "datasets>=4.3,<6",
        "evaluate>=0.4,<0.5",
        "huggingface_hub>=1.31,<3",
        "safetensors>=0.8,<1",
        # LLaVA v1 / Vicuna bases ship only a SentencePiece `tokenizer.model`; transformers reads it with both.
        "sentencepiece>=0.2",
        # The processor's prompts come from Jinja chat templates; transformers renders them only with jinja2>=3.1.6.
        "jinja2>=3.1.6",
        "protobuf>=4",
        "segment-anything>=1.0",
        "pycocotools>=2.0.8",
        "numpy>=1.26",
        "pillow>=10.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "selenium>=4.20", "gradio>=6.0,<7"],
        "train": ["deepspeed>=0.18,<1"],
        "demo": ["gradio>=6.0,<7"],
    },
    entry_points={
        "console_scripts": [
            "gsva-segment=gsva_hf.segment:main",
            "gsva-convert-to-hf=gsva_hf.convert_gsva_to_hf:main",
            "gsva-push=gsva_hf.hub:main",
            "gsva-compose=gsva_hf.compose:main",
        ],
    },
)

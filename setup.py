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
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "tokenizers>=0.22",
        "peft>=0.21",
        "accelerate>=1.10",
        "datasets>=4.0",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors>=0.6",
        # LLaVA v1 / Vicuna bases ship only a SentencePiece `tokenizer.model`; transformers reads it with both.
        "sentencepiece>=0.2",
        "protobuf>=4",
        "segment-anything>=1.0",
        "pycocotools>=2.0.8",
        "numpy>=1.26",
        "pillow>=10.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "selenium>=4.20", "gradio>=6.0,<7"],
        "train": ["deepspeed>=0.15"],
        "demo": ["gradio>=6.0,<7"],
    },
    entry_points={
        "console_scripts": [
            "gsva-segment=gsva_hf.segment:main",
            "gsva-convert-to-hf=gsva_hf.convert_gsva_to_hf:main",
            "gsva-push=gsva_hf.hub:main",
        ],
    },
)

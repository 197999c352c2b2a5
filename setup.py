from setuptools import find_packages, setup

setup(
    name="mlla-det",
    version="0.1.0",
    description="MLLA backbone for Mask R-CNN in mmdetection 3.x, with fused Triton linear-attention kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["mlla_kernels", "mlla_kernels.*", "mlla_det", "mlla_det.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "triton>=3.0; platform_system == 'Linux'",
        "mmengine==0.10.7",
        "mmcv-lite==2.1.0",
        "mmdet==3.3.0",
        "pycocotools",
        "numpy",
        "pillow",
    ],
    extras_require={"test": ["pytest"]},
)

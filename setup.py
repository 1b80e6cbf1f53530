"""Build of the optional native kernel (mergekit_lite/native/fused.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and every method runs on torch alone (the same
bytes, slower for task arithmetic and linear)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mergekit_lite._fused",
            ["mergekit_lite/native/fused.c"],
            # no contraction of a*b+c into one rounding except where the source asks for fmaf: torch's order of roundings
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)

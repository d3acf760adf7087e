"""The optional C extension; everything else is in pyproject.toml.

mmprep.imaging._resample (Pillow's resampling, bit for bit, computing only the window a processor keeps)
is optional: without a compiler the install still succeeds and mmprep uses Pillow's resize instead.
No -ffast-math and no FMA contraction: the filter coefficients must come out of the same double
operations as in Pillow.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mmprep.imaging._resample",
            ["mmprep/imaging/_resample.c"],
            optional=True,
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
        )
    ]
)

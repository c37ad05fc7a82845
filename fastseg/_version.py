__version__ = "0.1.0"

# A built fastseg (a wheel, or a source tree after `setup.py build_ext --inplace`) has a generated
# _build_config.py; its version carries the build's local tag, as torch's does: 0.1.0+cpu, 0.1.0+cu130. That
# full version is fastseg.__version__, build_info()["version"] and what pip shows. A source tree that was never
# built reports the bare version above. setup.py reads the first line only.
try:
    from fastseg._build_config import version as __version__  # noqa: F401
except ImportError:
    pass

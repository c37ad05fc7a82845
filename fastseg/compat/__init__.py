"""Front ends shaped like other libraries' APIs, computed by fastseg (see fastseg.compat.pydensecrf)."""

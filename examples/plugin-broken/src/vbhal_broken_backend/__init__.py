"""A plug-in that fails to import, as a plug-in with a missing native library would."""

raise ImportError("libexampledriver.so: cannot open shared object file (deliberately broken example plug-in)")

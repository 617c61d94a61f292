"""Where desired state comes from: the embedded store (apply), a watched directory, ..."""

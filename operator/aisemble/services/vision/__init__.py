"""The vision service: what an image is (format, size, EXIF, colours) and what it shows.

Everything but the optional classification runs on Pillow alone, so the
service answers at once; a classification model, when configured, loads in
the background and gates only the requests that ask for it.
"""

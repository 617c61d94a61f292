"""`python -m aisemble.services.vision`: serve the vision API (port 8000 unless PORT says)."""

from aisemble.services.common.serve import serve
from aisemble.services.vision.app import create

if __name__ == "__main__":
    serve("vision", create, 8000)

"""`python -m aisemble.services.nlp`: serve the NLP API (port 8000 unless PORT says)."""

from aisemble.services.common.serve import serve
from aisemble.services.nlp.app import create

if __name__ == "__main__":
    serve("nlp", create, 8000)

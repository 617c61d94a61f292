"""`python -m aisemble.services.llm`: the LLM service, configured by LLM_* variables."""

from aisemble.services.common.serve import serve
from aisemble.services.llm.app import create

serve("llm", create, 8000)

"""`python -m aisemble.services.data`: the data processor, configured by DATA_* variables."""

from aisemble.services.common.serve import serve
from aisemble.services.data.app import create

serve("data", create, 8000)

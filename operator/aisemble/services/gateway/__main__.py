from aisemble.services.common.serve import serve
from aisemble.services.gateway.app import create

serve("gateway", create, 8080)

"""Names of the records in fedpeft's Flower Messages, in a module without torch: the ClientApp
reads them before it knows whether the site takes part (``clients/client_app.py``)."""

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
STATUS = "status"  # ConfigRecord: status ('trained' | 'declined'), reason, ledger, public-key
SECAGG = "secagg"  # the ConfigRecord each secure-aggregation stage's messages and replies carry

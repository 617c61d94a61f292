"""The data processor: declarative operation lists run by pandas, or by Spark for big data.

A request is a list of steps (read, select, filter, derive, group, join, sort,
limit, write: `schemas`) over files under a data root (`files`); filters and
derived columns use a small safe expression language (`expressions`). The
runner (`runner`) checks each step and hands it to an engine: `engine_pandas`
by default, `engine_spark` for data larger than memory. Both give the same
result for the same list. They are the only modules importing pandas, pyarrow
or pyspark, and are imported on first use. `app.create()` builds the FastAPI
app; `python -m aisemble.services.data` serves it.
"""

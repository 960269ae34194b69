"""Snakemake script: write split.csv (the split the workflow made when it was parsed)."""

import pandas as pd

from kidney_seg.logs import log_to
from kidney_seg.split import write_split

with log_to(snakemake.log[0]):
    write_split(pd.DataFrame(snakemake.params.split), snakemake.output[0])

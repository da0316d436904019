"""Writers: Parquet files per stage, dropped rows, and the run manifest."""

"""Text before it is tokenized: scrape readers, the one cleaning definition, near-duplicate
removal and the preprocessing progress bar. Imports no other megagpt2 package, so datasets,
fine-tuning and tools can all use it (the pipeline that writes datasets is megagpt2.data.preprocess)."""

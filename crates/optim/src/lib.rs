//! AdamW optimizers.

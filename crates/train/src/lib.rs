//! Llama-family model, LoRA and the training schedule.

pub mod data;

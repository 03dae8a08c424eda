pub mod acks;
pub mod batch;
pub mod dedup;

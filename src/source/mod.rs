pub mod lan;
pub mod serial;

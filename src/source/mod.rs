pub mod ble;
pub mod lan;
pub mod serial;

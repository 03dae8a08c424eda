pub mod ble;
pub mod serial;

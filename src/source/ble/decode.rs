//! Decoders for the GATT profiles: pure functions from the bytes of one
//! notification/indication (or read) to measurements.
//!
//! Each follows its Bluetooth SIG characteristic definition; anything
//! malformed (truncated, reserved values, out of range) is a [`DecodeError`]
//! which the connection manager counts and skips. None of them panics, for
//! any input (see the proptest in this module).

use crate::reading::Value;

/// One decoded measurement: `sensor` is the reading's sensor name.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    pub sensor: &'static str,
    pub value: Value,
}

/// What one characteristic value decoded into.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Decoded {
    pub measurements: Vec<Measurement>,
    /// The device's own time stamp (Unix ms, read as UTC), when it sent one.
    pub device_ts_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: {what} needs {need} bytes, got {got}")]
    Truncated { what: &'static str, need: usize, got: usize },
    #[error("value out of range: {0}")]
    OutOfRange(&'static str),
    #[error("bad time stamp")]
    BadTimestamp,
}

fn need(what: &'static str, data: &[u8], n: usize) -> Result<(), DecodeError> {
    if data.len() < n { Err(DecodeError::Truncated { what, need: n, got: data.len() }) } else { Ok(()) }
}

fn u16le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// Heart Rate Measurement (0x2A37).
///
/// Flags: bit 0 HR is u16 (else u8); bits 1-2 sensor contact (ignored);
/// bit 3 Energy Expended (u16, kJ) present; bit 4 RR-Intervals (u16 each,
/// 1/1024 s) present, as many as fill the rest of the value.
pub fn heart_rate(data: &[u8]) -> Result<Decoded, DecodeError> {
    need("flags", data, 1)?;
    let flags = data[0];
    let mut rest = &data[1..];
    let hr = if flags & 0x01 != 0 {
        need("u16 heart rate", rest, 2)?;
        let v = u16le(rest);
        rest = &rest[2..];
        v
    } else {
        need("u8 heart rate", rest, 1)?;
        let v = rest[0] as u16;
        rest = &rest[1..];
        v
    };
    let mut out = vec![Measurement { sensor: "heart_rate", value: Value::Number(hr as f64) }];
    if flags & 0x08 != 0 {
        need("energy expended", rest, 2)?;
        out.push(Measurement { sensor: "energy_expended", value: Value::Number(u16le(rest) as f64) });
        rest = &rest[2..];
    }
    if flags & 0x10 != 0 {
        if rest.is_empty() || !rest.len().is_multiple_of(2) {
            return Err(DecodeError::Truncated { what: "RR intervals", need: rest.len() + 1, got: rest.len() });
        }
        let rr: Vec<f64> = rest.chunks_exact(2).map(|c| u16le(c) as f64 / 1024.0).collect();
        out.push(Measurement { sensor: "rr_interval", value: Value::Array(rr) });
    }
    Ok(Decoded { measurements: out, device_ts_ms: None })
}

/// An IEEE 11073-20601 32-bit FLOAT: `None` for the special values (NaN,
/// NRes, ±INFINITY, reserved), which carry no measurement.
pub fn ieee11073_float(raw: u32) -> Option<f64> {
    let mantissa = raw & 0x00FF_FFFF;
    // 0x7FFFFE +INF, 0x7FFFFF NaN, 0x800000 NRes, 0x800001 reserved, 0x800002 -INF.
    if (0x7F_FFFE..=0x80_0002).contains(&mantissa) {
        return None;
    }
    let m = ((mantissa << 8) as i32 >> 8) as f64; // sign-extend 24 bits
    let e = (raw >> 24) as u8 as i8 as i32;
    Some(m * 10f64.powi(e))
}

/// Temperature Measurement (0x2A1C, Health Thermometer).
///
/// Flags: bit 0 Fahrenheit (else Celsius); bit 1 Time Stamp present (year
/// u16, month, day, hours, minutes, seconds); bit 2 Temperature Type
/// present (u8). The reading is always `body_temp` in °C. A special FLOAT
/// (e.g. NaN: "no valid measurement") yields no measurement, not an error.
pub fn health_thermometer(data: &[u8]) -> Result<Decoded, DecodeError> {
    need("flags + temperature", data, 5)?;
    let flags = data[0];
    let raw = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
    let mut rest = &data[5..];
    let mut device_ts_ms = None;
    if flags & 0x02 != 0 {
        need("time stamp", rest, 7)?;
        device_ts_ms = Some(date_time_ms(&rest[..7])?);
        rest = &rest[7..];
    }
    if flags & 0x04 != 0 {
        need("temperature type", rest, 1)?;
    }
    let measurements = match ieee11073_float(raw) {
        Some(v) => {
            let c = if flags & 0x01 != 0 { (v - 32.0) * 5.0 / 9.0 } else { v };
            vec![Measurement { sensor: "body_temp", value: Value::Number(c) }]
        }
        None => Vec::new(),
    };
    Ok(Decoded { measurements, device_ts_ms })
}

/// Date Time (0x2A08) as Unix ms, read as UTC. Zero fields mean "not known"
/// in the spec; a time stamp with any of them is rejected.
fn date_time_ms(b: &[u8]) -> Result<u64, DecodeError> {
    let (year, month, day) = (u16le(b) as i64, b[2] as i64, b[3] as i64);
    let (h, mi, s) = (b[4] as i64, b[5] as i64, b[6] as i64);
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || h > 23
        || mi > 59
        || s > 59
    {
        return Err(DecodeError::BadTimestamp);
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 86_400 + h * 3600 + mi * 60 + s) * 1000) as u64)
}

/// Battery Level (0x2A19): one byte, 0-100 %.
pub fn battery(data: &[u8]) -> Result<Decoded, DecodeError> {
    need("battery level", data, 1)?;
    if data[0] > 100 {
        return Err(DecodeError::OutOfRange("battery level above 100 %"));
    }
    Ok(Decoded {
        measurements: vec![Measurement { sensor: "battery", value: Value::Number(data[0] as f64) }],
        device_ts_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn num(d: &Decoded, sensor: &str) -> f64 {
        match &d.measurements.iter().find(|m| m.sensor == sensor).unwrap().value {
            Value::Number(n) => *n,
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn heart_rate_u8_only() {
        let d = heart_rate(&[0x00, 72]).unwrap();
        assert_eq!(d.measurements, vec![Measurement { sensor: "heart_rate", value: Value::Number(72.0) }]);
    }

    #[test]
    fn heart_rate_u16_energy_and_several_rr() {
        // flags: u16 HR, contact detected (0b110), energy, RR; HR 300 bpm,
        // 1000 kJ, RR 1024 (1 s), 512 (0.5 s), 768 (0.75 s).
        let d = heart_rate(&[0x1F, 0x2C, 0x01, 0xE8, 0x03, 0x00, 0x04, 0x00, 0x02, 0x00, 0x03]).unwrap();
        assert_eq!(num(&d, "heart_rate"), 300.0);
        assert_eq!(num(&d, "energy_expended"), 1000.0);
        let rr = &d.measurements.iter().find(|m| m.sensor == "rr_interval").unwrap().value;
        assert_eq!(rr, &Value::Array(vec![1.0, 0.5, 0.75]));
    }

    #[test]
    fn heart_rate_single_rr_without_energy() {
        let d = heart_rate(&[0x10, 60, 0x00, 0x04]).unwrap();
        assert_eq!(d.measurements.len(), 2);
        assert_eq!(d.measurements[1].value, Value::Array(vec![1.0]));
    }

    #[test]
    fn heart_rate_truncated() {
        assert!(heart_rate(&[]).is_err());
        assert!(heart_rate(&[0x00]).is_err());
        assert!(heart_rate(&[0x01, 0x50]).is_err(), "u16 HR with one byte");
        assert!(heart_rate(&[0x08, 60, 0x01]).is_err(), "half an energy field");
        assert!(heart_rate(&[0x10, 60]).is_err(), "RR flag without RR");
        assert!(heart_rate(&[0x10, 60, 0x00, 0x04, 0x01]).is_err(), "odd RR bytes");
    }

    #[test]
    fn float_examples_and_specials() {
        // 36.4 = 364 x 10^-1: mantissa 0x00016C, exponent 0xFF.
        assert!((ieee11073_float(0xFF00_016C).unwrap() - 36.4).abs() < 1e-9);
        // negative mantissa: -1 x 10^0
        assert_eq!(ieee11073_float(0x00FF_FFFF), Some(-1.0));
        assert_eq!(ieee11073_float(0x0200_0005), Some(500.0));
        for special in [0x007F_FFFF, 0x0080_0000, 0x007F_FFFE, 0x0080_0002, 0x0080_0001] {
            assert_eq!(ieee11073_float(special), None, "{special:#x}");
        }
    }

    #[test]
    fn thermometer_celsius_fahrenheit_timestamp_type() {
        let d = health_thermometer(&[0x00, 0x6C, 0x01, 0x00, 0xFF]).unwrap();
        assert!((num(&d, "body_temp") - 36.4).abs() < 1e-9);
        assert_eq!(d.device_ts_ms, None);
        // 98.6 °F = 986 x 10^-1 with time stamp 2026-11-26 12:30:15 and type 2 (body).
        let mut v = vec![0x07, 0xDA, 0x03, 0x00, 0xFF];
        v.extend_from_slice(&[0xEA, 0x07, 11, 26, 12, 30, 15, 0x02]);
        let d = health_thermometer(&v).unwrap();
        assert!((num(&d, "body_temp") - 37.0).abs() < 1e-9);
        assert_eq!(d.device_ts_ms, Some(1_795_696_215_000));
    }

    #[test]
    fn thermometer_nan_is_no_measurement() {
        let d = health_thermometer(&[0x00, 0xFF, 0xFF, 0x7F, 0x00]).unwrap();
        assert!(d.measurements.is_empty());
    }

    #[test]
    fn thermometer_truncated_and_bad_time() {
        assert!(health_thermometer(&[0x00, 0x6C, 0x01, 0x00]).is_err());
        assert!(health_thermometer(&[0x02, 0x6C, 0x01, 0x00, 0xFF, 0xEA, 0x07]).is_err());
        assert!(health_thermometer(&[0x04, 0x6C, 0x01, 0x00, 0xFF]).is_err());
        let bad_month = [0x02, 0x6C, 0x01, 0x00, 0xFF, 0xEA, 0x07, 13, 1, 0, 0, 0];
        assert_eq!(health_thermometer(&bad_month), Err(DecodeError::BadTimestamp));
    }

    #[test]
    fn battery_levels() {
        assert_eq!(num(&battery(&[87]).unwrap(), "battery"), 87.0);
        assert!(battery(&[101]).is_err());
        assert!(battery(&[]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn gatt_decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = heart_rate(&data);
            let _ = health_thermometer(&data);
            let _ = battery(&data);
        }

        #[test]
        fn heart_rate_round_trips(hr in any::<u16>(), energy in proptest::option::of(any::<u16>()),
                                  rr in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut v = vec![0x01 | if energy.is_some() { 0x08 } else { 0 } | if rr.is_empty() { 0 } else { 0x10 }];
            v.extend_from_slice(&hr.to_le_bytes());
            if let Some(e) = energy { v.extend_from_slice(&e.to_le_bytes()); }
            for r in &rr { v.extend_from_slice(&r.to_le_bytes()); }
            let d = heart_rate(&v).unwrap();
            prop_assert_eq!(num(&d, "heart_rate"), hr as f64);
            prop_assert_eq!(d.measurements.len(), 1 + energy.is_some() as usize + !rr.is_empty() as usize);
        }
    }
}

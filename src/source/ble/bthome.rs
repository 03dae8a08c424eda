//! BTHome v2 advertisements (service data under UUID 0xFCD2): a pure
//! decoder, plaintext or AES-CCM encrypted with a per-device bindkey.
//!
//! Layout: one device-information byte (bit 0 encrypted, bit 1 MAC
//! included, bit 2 trigger-based, bits 5-7 version = 2), the MAC (6 bytes,
//! reversed) when bit 1 is set, then objects `id, data...` whose sizes are
//! fixed per id. Encrypted: `ciphertext, counter (4), MIC (4)`, nonce =
//! MAC (6, as written) + UUID (0xD2 0xFC) + device info + counter.
//!
//! Every object id of the v2 spec that carries a number becomes a
//! measurement (binary sensors as 0/1); events, text, raw and device
//! information objects are parsed past and skipped. The packet id (0x00)
//! is the packet's `seq`. An unknown object id stops parsing, as the spec
//! says (its size is unknown); what came before it is kept.

use crate::reading::Value;
use aes::Aes128;
use ccm::aead::generic_array::GenericArray;
use ccm::aead::{AeadInPlace, KeyInit};
use ccm::consts::{U4, U13};

pub const SERVICE_UUID16: u16 = 0xFCD2;

/// One decoded advertisement.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Packet {
    pub packet_id: Option<u8>,
    /// `(sensor, value)`; a sensor repeated in one packet gets `_2`, `_3`...
    pub measurements: Vec<(String, Value)>,
    pub encrypted: bool,
    pub trigger_based: bool,
    /// The encryption counter, when encrypted.
    pub counter: Option<u32>,
    /// Parsing stopped at this unknown object id.
    pub unknown_object: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BthomeError {
    #[error("empty service data")]
    Empty,
    #[error("not BTHome v2 (version {0})")]
    Version(u8),
    #[error("encrypted advert but no bindkey configured")]
    NoKey,
    #[error("plaintext advert from a device with a bindkey (ignored)")]
    Downgrade,
    #[error("encrypted advert too short or too long")]
    ShortCiphertext,
    #[error("decryption failed (wrong bindkey or corrupt advert)")]
    Decrypt,
    #[error("truncated object {id:#04x}: needs {need} bytes, {got} left")]
    Truncated { id: u8, need: usize, got: usize },
}

#[derive(Clone, Copy)]
enum Kind {
    /// A number: `raw * mul / div`.
    Num { signed: bool, mul: f64, div: f64 },
    /// Parsed past, not a measurement (events, device information).
    Skip,
    /// One length byte, then that many bytes (text, raw); skipped.
    Var,
}

#[derive(Clone, Copy)]
struct Obj {
    name: &'static str,
    len: usize,
    kind: Kind,
}

const fn u(name: &'static str, len: usize, mul: f64, div: f64) -> Obj {
    Obj { name, len, kind: Kind::Num { signed: false, mul, div } }
}
const fn s(name: &'static str, len: usize, mul: f64, div: f64) -> Obj {
    Obj { name, len, kind: Kind::Num { signed: true, mul, div } }
}
const fn bin(name: &'static str) -> Obj {
    u(name, 1, 1.0, 1.0)
}
const fn skip(name: &'static str, len: usize) -> Obj {
    Obj { name, len, kind: Kind::Skip }
}

/// The v2 object table: id → name, size, scaling.
fn object(id: u8) -> Option<Obj> {
    Some(match id {
        0x00 => u("packet_id", 1, 1.0, 1.0),
        0x01 => u("battery", 1, 1.0, 1.0),
        0x02 => s("temperature", 2, 1.0, 100.0),
        0x03 => u("humidity", 2, 1.0, 100.0),
        0x04 => u("pressure", 3, 1.0, 100.0),
        0x05 => u("illuminance", 3, 1.0, 100.0),
        0x06 => u("mass_kg", 2, 1.0, 100.0),
        0x07 => u("mass_lb", 2, 1.0, 100.0),
        0x08 => s("dewpoint", 2, 1.0, 100.0),
        0x09 => u("count", 1, 1.0, 1.0),
        0x0A => u("energy", 3, 1.0, 1000.0),
        0x0B => u("power", 3, 1.0, 100.0),
        0x0C => u("voltage", 2, 1.0, 1000.0),
        0x0D => u("pm2_5", 2, 1.0, 1.0),
        0x0E => u("pm10", 2, 1.0, 1.0),
        0x0F => bin("generic"),
        0x10 => bin("power_on"),
        0x11 => bin("opening"),
        0x12 => u("co2", 2, 1.0, 1.0),
        0x13 => u("tvoc", 2, 1.0, 1.0),
        0x14 => u("moisture", 2, 1.0, 100.0),
        0x15 => bin("battery_low"),
        0x16 => bin("battery_charging"),
        0x17 => bin("carbon_monoxide"),
        0x18 => bin("cold"),
        0x19 => bin("connectivity"),
        0x1A => bin("door"),
        0x1B => bin("garage_door"),
        0x1C => bin("gas_detected"),
        0x1D => bin("heat"),
        0x1E => bin("light"),
        0x1F => bin("lock"),
        0x20 => bin("moisture_detected"),
        0x21 => bin("motion"),
        0x22 => bin("moving"),
        0x23 => bin("occupancy"),
        0x24 => bin("plug"),
        0x25 => bin("presence"),
        0x26 => bin("problem"),
        0x27 => bin("running"),
        0x28 => bin("safety"),
        0x29 => bin("smoke"),
        0x2A => bin("sound"),
        0x2B => bin("tamper"),
        0x2C => bin("vibration"),
        0x2D => bin("window"),
        0x2E => u("humidity", 1, 1.0, 1.0),
        0x2F => u("moisture", 1, 1.0, 1.0),
        0x3A => skip("button", 1),
        0x3C => skip("dimmer", 2),
        0x3D => u("count", 2, 1.0, 1.0),
        0x3E => u("count", 4, 1.0, 1.0),
        0x3F => s("rotation", 2, 1.0, 10.0),
        0x40 => u("distance_mm", 2, 1.0, 1.0),
        0x41 => u("distance_m", 2, 1.0, 10.0),
        0x42 => u("duration", 3, 1.0, 1000.0),
        0x43 => u("current", 2, 1.0, 1000.0),
        0x44 => u("speed", 2, 1.0, 100.0),
        0x45 => s("temperature", 2, 1.0, 10.0),
        0x46 => u("uv_index", 1, 1.0, 10.0),
        0x47 => u("volume_l", 2, 1.0, 10.0),
        0x48 => u("volume_ml", 2, 1.0, 1.0),
        0x49 => u("volume_flow_rate", 2, 1.0, 1000.0),
        0x4A => u("voltage", 2, 1.0, 10.0),
        0x4B => u("gas", 3, 1.0, 1000.0),
        0x4C => u("gas", 4, 1.0, 1000.0),
        0x4D => u("energy", 4, 1.0, 1000.0),
        0x4E => u("volume", 4, 1.0, 1000.0),
        0x4F => u("water", 4, 1.0, 1000.0),
        0x50 => u("timestamp", 4, 1.0, 1.0),
        0x51 => u("acceleration", 2, 1.0, 1000.0),
        0x52 => u("gyroscope", 2, 1.0, 1000.0),
        0x53 => Obj { name: "text", len: 0, kind: Kind::Var },
        0x54 => Obj { name: "raw", len: 0, kind: Kind::Var },
        0x55 => u("volume_storage", 4, 1.0, 1000.0),
        0x56 => u("conductivity", 2, 1.0, 1.0),
        0x57 => s("temperature", 1, 1.0, 1.0),
        0x58 => s("temperature", 1, 35.0, 100.0),
        0x59 => s("count", 1, 1.0, 1.0),
        0x5A => s("count", 2, 1.0, 1.0),
        0x5B => s("count", 4, 1.0, 1.0),
        0x5C => s("power", 4, 1.0, 100.0),
        0x5D => s("current", 2, 1.0, 1000.0),
        0x5E => u("direction", 2, 1.0, 100.0),
        0x5F => u("precipitation", 2, 1.0, 10.0),
        0x60 => u("channel", 1, 1.0, 1.0),
        0x61 => u("rotational_speed", 2, 1.0, 1.0),
        0x62 => s("speed", 4, 1.0, 1_000_000.0),
        0x63 => s("acceleration", 4, 1.0, 1_000_000.0),
        0x64 => u("light_level", 1, 1.0, 1.0),
        0xF0 => skip("device_type", 2),
        0xF1 => skip("firmware_version", 4),
        0xF2 => skip("firmware_version", 3),
        _ => return None,
    })
}

/// Every object id the decoder knows, for tests and fuzzing.
pub fn known_object_ids() -> impl Iterator<Item = u8> {
    (0..=255u8).filter(|&id| object(id).is_some())
}

/// Size in bytes of a fixed-size object's data (`None`: unknown or variable).
pub fn object_len(id: u8) -> Option<usize> {
    object(id).filter(|o| !matches!(o.kind, Kind::Var)).map(|o| o.len)
}

fn int_le(b: &[u8], signed: bool) -> f64 {
    let mut v: u64 = 0;
    for (i, &x) in b.iter().enumerate() {
        v |= (x as u64) << (8 * i);
    }
    if signed {
        let shift = 64 - 8 * b.len() as u32;
        (((v << shift) as i64) >> shift) as f64
    } else {
        v as f64
    }
}

/// Decode BTHome v2 service data. `mac` is the advertiser's address as
/// written (`AA:BB:..` → `[0xAA, 0xBB, ..]`), used in the nonce unless the
/// advert carries its own; `bindkey` is required for encrypted adverts,
/// and when given, plaintext adverts are refused (no silent downgrade).
pub fn decode(data: &[u8], mac: [u8; 6], bindkey: Option<&[u8; 16]>) -> Result<Packet, BthomeError> {
    let (&info, mut rest) = data.split_first().ok_or(BthomeError::Empty)?;
    let version = info >> 5;
    if version != 2 {
        return Err(BthomeError::Version(version));
    }
    let mut p = Packet { encrypted: info & 0x01 != 0, trigger_based: info & 0x04 != 0, ..Default::default() };
    let mut mac = mac;
    if info & 0x02 != 0 {
        if rest.len() < 6 {
            return Err(BthomeError::Truncated { id: 0xFF, need: 6, got: rest.len() });
        }
        for (i, b) in rest[..6].iter().rev().enumerate() {
            mac[i] = *b;
        }
        rest = &rest[6..];
    }
    let mut plain = [0u8; 31];
    let objects: &[u8] = if p.encrypted {
        let key = bindkey.ok_or(BthomeError::NoKey)?;
        if rest.len() < 8 || rest.len() - 8 > plain.len() {
            return Err(BthomeError::ShortCiphertext);
        }
        let (ct, tail) = rest.split_at(rest.len() - 8);
        let (counter, mic) = tail.split_at(4);
        let counter = u32::from_le_bytes([counter[0], counter[1], counter[2], counter[3]]);
        let buf = &mut plain[..ct.len()];
        buf.copy_from_slice(ct);
        ccm::Ccm::<Aes128, U4, U13>::new(GenericArray::from_slice(key))
            .decrypt_in_place_detached(
                GenericArray::from_slice(&nonce(mac, info, counter)),
                &[],
                buf,
                GenericArray::from_slice(mic),
            )
            .map_err(|_| BthomeError::Decrypt)?;
        p.counter = Some(counter);
        &plain[..ct.len()]
    } else {
        if bindkey.is_some() {
            return Err(BthomeError::Downgrade);
        }
        rest
    };
    parse_objects(objects, &mut p)?;
    Ok(p)
}

fn parse_objects(mut rest: &[u8], p: &mut Packet) -> Result<(), BthomeError> {
    while let Some((&id, after)) = rest.split_first() {
        let Some(obj) = object(id) else {
            p.unknown_object = Some(id);
            return Ok(());
        };
        let len = match obj.kind {
            Kind::Var => 1 + *after.first().ok_or(BthomeError::Truncated { id, need: 1, got: 0 })? as usize,
            _ => obj.len,
        };
        if after.len() < len {
            return Err(BthomeError::Truncated { id, need: len, got: after.len() });
        }
        let (field, next) = after.split_at(len);
        rest = next;
        let Kind::Num { signed, mul, div } = obj.kind else { continue };
        if id == 0x00 {
            p.packet_id = Some(field[0]);
            continue;
        }
        let value = int_le(field, signed) * mul / div;
        let n =
            p.measurements.iter().filter(|(s, _)| s == obj.name || s.starts_with(&format!("{}_", obj.name))).count();
        let name = if n == 0 { obj.name.to_string() } else { format!("{}_{}", obj.name, n + 1) };
        p.measurements.push((name, Value::Number(value)));
    }
    Ok(())
}

/// The AES-CCM nonce: MAC (as written), UUID16 (little-endian), device info, counter.
fn nonce(mac: [u8; 6], info: u8, counter: u32) -> [u8; 13] {
    let mut n = [0u8; 13];
    n[..6].copy_from_slice(&mac);
    n[6..8].copy_from_slice(&SERVICE_UUID16.to_le_bytes());
    n[8] = info;
    n[9..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Encrypt objects into BTHome v2 service data (the device side: used by
/// the fake devices in tests and benches).
pub fn encrypt(objects: &[u8], mac: [u8; 6], key: &[u8; 16], counter: u32) -> Vec<u8> {
    encrypt_with_info(objects, mac, key, counter, 0x41)
}

/// [`encrypt`] with another device-information byte (e.g. 0x43: MAC
/// included; the caller inserts the MAC after it).
pub fn encrypt_with_info(objects: &[u8], mac: [u8; 6], key: &[u8; 16], counter: u32, info: u8) -> Vec<u8> {
    let mut buf = objects.to_vec();
    let cipher = ccm::Ccm::<Aes128, U4, U13>::new(GenericArray::from_slice(key));
    let tag = cipher
        .encrypt_in_place_detached(GenericArray::from_slice(&nonce(mac, info, counter)), &[], &mut buf)
        .expect("CCM takes any BTHome-sized payload");
    let mut out = vec![info];
    out.extend_from_slice(&buf);
    out.extend_from_slice(&counter.to_le_bytes());
    out.extend_from_slice(&tag);
    out
}

/// Parse a 32-hex-digit bindkey.
pub fn parse_bindkey(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut k = [0u8; 16];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: [u8; 6] = [0x54, 0x48, 0xE6, 0x8F, 0x80, 0xA5];
    const KEY: &str = "231d39c1d7cc1ab1aee224cd096db932";

    fn val(p: &Packet, sensor: &str) -> f64 {
        match p.measurements.iter().find(|(s, _)| s == sensor) {
            Some((_, Value::Number(n))) => *n,
            other => panic!("{sensor}: {other:?} in {p:?}"),
        }
    }

    #[test]
    fn spec_plaintext_example() {
        // From the BTHome v2 docs: temperature 25.06 °C, humidity 50.55 %.
        let p = decode(&[0x40, 0x02, 0xCA, 0x09, 0x03, 0xBF, 0x13], MAC, None).unwrap();
        assert_eq!(val(&p, "temperature"), 25.06);
        assert_eq!(val(&p, "humidity"), 50.55);
        assert_eq!(p.packet_id, None);
        assert!(!p.encrypted);
    }

    #[test]
    fn spec_encryption_example() {
        // The BTHome v2 encryption example: key 231d39c1..., MAC 54:48:E6:8F:80:A5,
        // counter bytes 00 11 22 33, payload 02CA0903BF13.
        let adv = [0x41, 0xa4, 0x72, 0x66, 0xc9, 0x5f, 0x73, 0x00, 0x11, 0x22, 0x33, 0x78, 0x23, 0x72, 0x14];
        let key = parse_bindkey(KEY).unwrap();
        let p = decode(&adv, MAC, Some(&key)).unwrap();
        assert_eq!(val(&p, "temperature"), 25.06);
        assert_eq!(val(&p, "humidity"), 50.55);
        assert_eq!(p.counter, Some(0x3322_1100));
        assert!(p.encrypted);
        assert_eq!(encrypt(&[0x02, 0xCA, 0x09, 0x03, 0xBF, 0x13], MAC, &key, 0x3322_1100), adv);
    }

    #[test]
    fn wrong_bindkey_missing_key_and_downgrade() {
        let key = parse_bindkey(KEY).unwrap();
        let adv = encrypt(&[0x00, 7, 0x01, 50], MAC, &key, 1);
        let mut wrong = key;
        wrong[0] ^= 1;
        assert_eq!(decode(&adv, MAC, Some(&wrong)), Err(BthomeError::Decrypt));
        assert_eq!(decode(&adv, [0; 6], Some(&key)), Err(BthomeError::Decrypt), "nonce uses the MAC");
        assert_eq!(decode(&adv, MAC, None), Err(BthomeError::NoKey));
        assert_eq!(decode(&[0x40, 0x01, 50], MAC, Some(&key)), Err(BthomeError::Downgrade));
        assert_eq!(decode(&adv[..7], MAC, Some(&key)), Err(BthomeError::ShortCiphertext));
        let p = decode(&adv, MAC, Some(&key)).unwrap();
        assert_eq!((p.packet_id, val(&p, "battery")), (Some(7), 50.0));
    }

    #[test]
    fn every_object_size_and_sign() {
        // Every fixed-size object with all data bytes 0xFF decodes, consumes
        // exactly its size (the packet id after it is found), and signed
        // objects read -1 x factor.
        for id in known_object_ids().filter(|&id| id != 0) {
            let Some(len) = object_len(id) else { continue };
            let mut adv = vec![0x40, id];
            adv.extend(std::iter::repeat_n(0xFF, len));
            adv.extend_from_slice(&[0x00, 9]);
            let p = decode(&adv, MAC, None).unwrap_or_else(|e| panic!("{id:#x}: {e}"));
            assert_eq!(p.packet_id, Some(9), "{id:#x} has size {len}");
            let Kind::Num { signed, mul, div } = object(id).unwrap().kind else {
                assert!(p.measurements.is_empty(), "{id:#x} is skipped");
                continue;
            };
            let (_, Value::Number(v)) = &p.measurements[0] else { panic!() };
            let expect = if signed { -mul / div } else { ((1u64 << (8 * len)) - 1) as f64 * mul / div };
            assert_eq!(*v, expect, "{id:#x}");
            // One byte short is truncated.
            assert!(matches!(decode(&adv[..2 + len - 1], MAC, None), Err(BthomeError::Truncated { .. })), "{id:#x}");
        }
        assert_eq!(object_len(0x02), Some(2));
        assert_eq!(object_len(0x04), Some(3));
        assert_eq!(object_len(0x3E), Some(4));
        assert_eq!(object_len(0x53), None);
    }

    #[test]
    fn examples_from_the_object_table() {
        let p = decode(&[0x40, 0x04, 0x13, 0x8A, 0x01], MAC, None).unwrap();
        assert_eq!(val(&p, "pressure"), 1008.83);
        let p = decode(&[0x40, 0x3F, 0x02, 0x0C], MAC, None).unwrap();
        assert_eq!(val(&p, "rotation"), 307.4);
        let p = decode(&[0x40, 0x45, 0x11, 0x01], MAC, None).unwrap();
        assert_eq!(val(&p, "temperature"), 27.3);
        let p = decode(&[0x40, 0x5D, 0x67, 0xFE], MAC, None).unwrap();
        assert_eq!(val(&p, "current"), -0.409);
        let p = decode(&[0x40, 0x58, 0x24], MAC, None).unwrap();
        assert!((val(&p, "temperature") - 12.6).abs() < 1e-9);
    }

    #[test]
    fn repeated_sensors_text_raw_and_unknown_objects() {
        let p = decode(&[0x44, 0x00, 3, 0x02, 0x10, 0x00, 0x02, 0x20, 0x00, 0x53, 2, b'h', b'i', 0x01, 80], MAC, None)
            .unwrap();
        assert!(p.trigger_based);
        let names: Vec<_> = p.measurements.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["temperature", "temperature_2", "battery"]);
        let p = decode(&[0x40, 0x01, 80, 0xEE, 1, 2, 3], MAC, None).unwrap();
        assert_eq!((p.unknown_object, p.measurements.len()), (Some(0xEE), 1));
        assert!(matches!(decode(&[0x40, 0x54, 5, 1], MAC, None), Err(BthomeError::Truncated { id: 0x54, .. })));
    }

    #[test]
    fn header_errors_and_mac_included() {
        assert_eq!(decode(&[], MAC, None), Err(BthomeError::Empty));
        assert_eq!(decode(&[0x20, 0x01, 1], MAC, None), Err(BthomeError::Version(1)));
        // MAC included (bit 1), reversed in the advert; used for the nonce.
        let key = parse_bindkey(KEY).unwrap();
        let mut adv = encrypt_with_info(&[0x01, 42], MAC, &key, 5, 0x43);
        adv.splice(1..1, MAC.iter().rev().copied());
        let p = decode(&adv, [0; 6], Some(&key)).unwrap();
        assert_eq!(val(&p, "battery"), 42.0);
        assert!(matches!(decode(&adv[..4], MAC, None), Err(BthomeError::Truncated { .. })));
    }

    #[test]
    fn bindkeys() {
        assert!(parse_bindkey(KEY).is_some());
        assert!(parse_bindkey("231d").is_none());
        assert!(parse_bindkey("zz1d39c1d7cc1ab1aee224cd096db932").is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..40), keyed in any::<bool>()) {
            let key = [7u8; 16];
            let _ = decode(&data, MAC, keyed.then_some(&key));
        }

        #[test]
        fn valid_object_streams_decode(ids in proptest::collection::vec(proptest::sample::select(
            known_object_ids().filter(|&i| object_len(i).is_some()).collect::<Vec<_>>()), 0..6),
            fill in any::<u8>(), key in any::<[u8; 16]>(), counter in any::<u32>()) {
            let mut objects = Vec::new();
            for id in &ids {
                objects.push(*id);
                objects.extend(std::iter::repeat_n(fill, object_len(*id).unwrap()));
            }
            let mut plain = vec![0x40];
            plain.extend_from_slice(&objects);
            let p = decode(&plain, MAC, None).unwrap();
            prop_assert_eq!(p.unknown_object, None);
            if objects.len() <= 31 {
                let q = decode(&encrypt(&objects, MAC, &key, counter), MAC, Some(&key)).unwrap();
                prop_assert_eq!(q.measurements, p.measurements);
            }
        }
    }
}

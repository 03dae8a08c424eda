//! The fuzz harnesses: one function per target in `fuzz_targets/`, each
//! feeding arbitrary bytes to a decoder the gateway runs on bytes from
//! outside, the way the gateway calls it. The same functions replay the
//! corpus as ordinary tests (`tests/fuzz_corpus.rs` includes this file), so
//! CI runs every corpus file without nightly. A harness fails only by
//! panicking (or, under the fuzzer, by hanging or running out of memory);
//! errors returned by the decoders are the expected outcome for bad input.
//!
//! Where a decoder sits behind a checksum or a MIC (COBS frames, encrypted
//! BTHome), the harness also builds a valid envelope around the fuzzer's
//! bytes, so what lies behind the check is fuzzed too.

use edge_gateway::broker::proxy;
use edge_gateway::broker::topic::TopicPattern;
use edge_gateway::config::Framing;
use edge_gateway::source::ble::{bthome, decode};
use edge_gateway::uplink::codec;
use edge_gateway::wire;

const NOW: u64 = 1_700_000_000_000;
/// The MAC and bindkey of the encrypted BTHome target (any would do).
pub const MAC: [u8; 6] = [0xA4, 0xC1, 0x38, 0x8D, 0x18, 0xB2];
pub const BINDKEY: [u8; 16] = *b"\x23\x1d\x39\xc1\xd7\xcc\x1a\xb1\xae\xe2\x24\xcd\x09\x6d\xb9\x32";
/// The default `broker.ingest` pattern.
pub const INGEST: &str = "sensors/{device}/{sensor}";

/// Feed `data` to a splitter in chunks whose sizes come from the data, as
/// reads from a port arrive.
fn split(framing: Framing, data: &[u8], mut on_frame: impl FnMut(&mut [u8])) {
    let mut s = wire::FrameSplitter::new(framing);
    let Some((&step, rest)) = data.split_first() else { return };
    let step = (step as usize % 64) + 1;
    for chunk in rest.chunks(step) {
        s.feed(chunk, |f| {
            if let Ok(f) = f {
                on_frame(f)
            }
        });
    }
}

/// Serial, jsonl framing: line splitting and reading parsing.
pub fn serial_jsonl(data: &[u8]) {
    split(Framing::Jsonl, data, |line| {
        let _ = wire::parse_reading(Framing::Jsonl, line, Some("dock-1"), NOW);
        let _ = wire::parse_jsonl(line, None, NOW);
    });
}

/// Serial, COBS framing: frame splitting, COBS, CRC, postcard, reading
/// rules. The first byte picks the mode: raw bytes (`& 1 == 0`), or the
/// rest taken as a frame body behind a valid CRC and COBS encoding.
pub fn serial_cobs(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        split(Framing::Cobs, rest, |frame| {
            let mut copy = frame.to_vec();
            let _ = wire::parse_reading(Framing::Cobs, frame, Some("dock-1"), NOW);
            let _ = wire::parse_cobs(&mut copy, None, NOW);
        });
    } else {
        split(Framing::Cobs, &cobs_envelope(rest), |frame| {
            let _ = wire::parse_cobs(frame, Some("dock-1"), NOW);
        });
    }
}

/// BLE Heart Rate Measurement (0x2A37).
pub fn ble_heart_rate(data: &[u8]) {
    let _ = decode::heart_rate(data);
}

/// BLE Temperature Measurement (0x2A1C).
pub fn ble_thermometer(data: &[u8]) {
    let _ = decode::health_thermometer(data);
}

/// BLE Battery Level (0x2A19).
pub fn ble_battery(data: &[u8]) {
    let _ = decode::battery(data);
}

/// BTHome v2 service data from a device without a bindkey.
pub fn bthome_plain(data: &[u8]) {
    let _ = bthome::decode(data, MAC, None);
}

/// BTHome v2 from a device with a bindkey. The first byte picks the mode:
/// the rest as raw service data (`& 1 == 0`; the MIC stops almost all of
/// it), or the rest as objects that a device with the right key encrypts
/// first, so the decoder's object parsing after decryption is fuzzed too.
pub fn bthome_encrypted(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        let _ = bthome::decode(rest, MAC, Some(&BINDKEY));
    } else {
        let counter = u32::from(mode) << 8 | rest.len() as u32;
        // Version 2, encrypted, maybe trigger-based.
        let info = 0x41 | (mode & 0x04);
        let adv = bthome::encrypt_with_info(rest, MAC, &BINDKEY, counter, info);
        let r = bthome::decode(&adv, MAC, Some(&BINDKEY));
        assert!(
            !matches!(r, Err(bthome::BthomeError::Decrypt)),
            "an advert encrypted with the right key and MAC failed to decrypt"
        );
    }
}

/// LAN MQTT: the topic (up to the first `\n`) through the ingest pattern,
/// the rest as the payload, as `source::lan` takes a PUBLISH.
pub fn lan_mqtt(data: &[u8]) {
    let (topic, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let pattern = TopicPattern::parse(INGEST).expect("the default ingest pattern");
    let topic = String::from_utf8_lossy(topic);
    if let Some((device, sensor)) = pattern.matches(&topic) {
        let _ = wire::parse_mqtt_payload(payload, device, sensor, NOW);
    }
    // The pattern is only a prefix filter for what reaches the parser.
    let _ = wire::parse_mqtt_payload(payload, "dev", "sensor", NOW);
}

/// The uplink's MQTT decoder on what a broker sends: packets one after the
/// other from a stream, v3.1.1 or v5 by the first byte.
pub fn uplink_codec(data: &[u8]) {
    let Some((&mode, mut buf)) = data.split_first() else { return };
    let protocol = if mode & 1 == 0 { codec::Protocol::V311 } else { codec::Protocol::V5 };
    let max_len = if mode & 2 == 0 { 1 << 20 } else { 64 };
    while let Ok(Some((_, used))) = codec::decode(protocol, buf, max_len) {
        assert!(used > 0 && used <= buf.len(), "decode took {used} of {} bytes", buf.len());
        buf = &buf[used..];
    }
}

/// The front door (`broker::proxy`): what it reads from a LAN client before
/// rumqttd sees anything. The first packet is the CONNECT (protocol level,
/// then rumqttd's own CONNECT parser, as `handle` does); every later packet
/// is framed and, when a PUBLISH, its topic, packet id and payload are taken
/// apart as `relay` does with `broker.ack = "durable"`.
pub fn front_door(data: &[u8]) {
    use proxy::Frame;
    let mut buf = data;
    let Frame::Len { total, .. } = proxy::frame_len(buf) else { return };
    if total > buf.len() || total > proxy::MAX_CONNECT {
        return;
    }
    let (connect, rest) = buf.split_at(total);
    buf = rest;
    let v5 = match proxy::protocol_level(connect) {
        Ok(level @ (4 | 5)) => {
            let mut raw = bytes::BytesMut::from(connect);
            use rumqttd::protocol::Protocol;
            let _ = if level == 5 {
                rumqttd::protocol::v5::V5.read_mut(&mut raw, proxy::MAX_CONNECT)
            } else {
                rumqttd::protocol::v4::V4.read_mut(&mut raw, proxy::MAX_CONNECT)
            };
            level == 5
        }
        _ => return,
    };
    let ingest = TopicPattern::parse(INGEST).expect("the default ingest pattern");
    loop {
        match proxy::frame_len(buf) {
            Frame::Need | Frame::Bad => return,
            Frame::Len { total, .. } if total > buf.len() => return,
            Frame::Len { total, header } => {
                let (packet, rest) = buf.split_at(total);
                buf = rest;
                // Err: the front door closes the connection.
                let Ok(parts) = proxy::publish_parts(packet, header, v5) else { return };
                if let Some(p) = parts
                    && let Some((device, sensor)) = ingest.matches(p.topic)
                {
                    let _ = wire::parse_mqtt_payload(p.payload, device, sensor, 0);
                }
            }
        }
    }
}

/// The `decode` command's payload reader (and the test subscribers'):
/// a batch as JSON or postcard.
pub fn batch_decode(data: &[u8]) {
    let _ = edge_gateway::Batch::decode(data);
}

/// The config file: TOML, then validation, with `file:line:col` errors.
pub fn config_toml(data: &[u8]) {
    if let Ok(src) = std::str::from_utf8(data) {
        let _ = edge_gateway::config::Config::parse(src, "fuzz.toml");
    }
}

/// The way down: a command as the cloud sends it on the commands topic,
/// and the devices' answers as they arrive (serial jsonl lines, COBS frames
/// raw or behind a valid CRC and COBS, LAN `commands/{device}/ack`
/// payloads). The first byte picks which.
pub fn downlink(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 5 {
        0 => {
            let ttl = std::time::Duration::from_secs(600);
            if let Ok(c) = edge_gateway::downlink::parse_command(rest, ttl, NOW) {
                assert!(!c.id.is_empty() && !c.name.is_empty(), "a command without an id or name: {c:?}");
                assert!(c.expires_ms >= c.received_ms, "a command that expired before it came: {c:?}");
                let _: serde_json::Value = serde_json::from_str(&c.args).expect("args stay JSON");
            }
        }
        1 => split(Framing::Jsonl, rest, |line| {
            let _ = wire::parse_from_device(Framing::Jsonl, line, Some("dock-1"), NOW);
        }),
        2 => split(Framing::Cobs, rest, |frame| {
            let _ = wire::parse_from_device(Framing::Cobs, frame, Some("dock-1"), NOW);
        }),
        3 => split(Framing::Cobs, &cobs_envelope(rest), |frame| {
            let _ = wire::parse_from_device(Framing::Cobs, frame, Some("dock-1"), NOW);
        }),
        _ => {
            let _ = wire::parse_command_ack_mqtt("wrist-01", rest);
        }
    }
}

/// `body` as one valid COBS frame (CRC appended, encoded, 0x00 ended),
/// after a chunk-size byte for [`split`].
fn cobs_envelope(body: &[u8]) -> Vec<u8> {
    let mut raw = body.to_vec();
    raw.extend_from_slice(&wire::frame::CRC.checksum(body).to_le_bytes());
    let mut enc = vec![0u8; cobs::max_encoding_length(raw.len()) + 2];
    enc[0] = 255;
    let n = cobs::encode(&raw, &mut enc[1..]);
    enc.truncate(n + 1);
    enc.push(0);
    enc
}

/// Every target by its name (the corpus replay test walks them).
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("serial_jsonl", serial_jsonl),
    ("serial_cobs", serial_cobs),
    ("ble_heart_rate", ble_heart_rate),
    ("ble_thermometer", ble_thermometer),
    ("ble_battery", ble_battery),
    ("bthome_plain", bthome_plain),
    ("bthome_encrypted", bthome_encrypted),
    ("lan_mqtt", lan_mqtt),
    ("uplink_codec", uplink_codec),
    ("front_door", front_door),
    ("batch_decode", batch_decode),
    ("config_toml", config_toml),
    ("downlink", downlink),
];

//! The seed corpora, `fuzz/corpus/<target>/seed-*`, from the same inputs
//! the unit tests use (and the project's own encoders, so the seeds are
//! valid frames, adverts, packets and batches). Written by an ignored test
//! (a fuzz build cannot link a plain binary):
//!
//!   cargo test --test fuzz_corpus -- --ignored write_seeds
use crate::harness::{BINDKEY, MAC};
use edge_gateway::source::ble::bthome;
use edge_gateway::uplink::codec::{self, Connect, Protocol};
use edge_gateway::{Batch, Format, Reading, Value, wire};
use std::path::Path;

fn write(target: &str, seeds: &[Vec<u8>]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s).unwrap();
    }
    println!("{target}: {} seeds", seeds.len());
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn readings() -> Vec<Reading> {
    vec![
        Reading {
            device: "wrist-01".into(),
            sensor: "hr".into(),
            seq: Some(1),
            ts: 1_764_000_000_000,
            value: Value::Number(72.0),
            boot: None,
        },
        Reading {
            device: "wrist-01".into(),
            sensor: "spo2".into(),
            seq: Some(2),
            ts: 1_764_000_000_100,
            value: Value::Number(97.5),
            boot: Some(3),
        },
        Reading {
            device: "ring_7".into(),
            sensor: "acc".into(),
            seq: None,
            ts: 5,
            value: Value::Array(vec![0.1, -9.8, 0.0]),
            boot: None,
        },
        Reading {
            device: "d".into(),
            sensor: "t".into(),
            seq: Some(u64::MAX),
            ts: 0,
            value: Value::Number(-0.0),
            boot: Some(u32::MAX),
        },
    ]
}

pub fn write_all() {
    let rs = readings();

    // Serial jsonl: a chunk-size byte, then lines as devices send them.
    let mut lines: Vec<Vec<u8>> = rs.iter().map(wire::encode_reading_jsonl).collect();
    lines.push(b"{\"sensor\":\"hr\",\"seq\":3,\"value\":70}\r\n".to_vec());
    lines.push(b"{\"device\":\"w\",\"sensor\":\"s\",\"value\":[1,2,3]}\n".to_vec());
    lines.push(b"{\"device\":\"bad id\",\"sensor\":\"s\",\"value\":1}\n{\"seq\":1}\n97\n\xff\n".to_vec());
    let all: Vec<u8> = lines.concat();
    let mut seeds: Vec<Vec<u8>> = lines.iter().map(|l| cat(&[&[63], l])).collect();
    seeds.push(cat(&[&[3], &all]));
    write("serial_jsonl", &seeds);

    // Serial cobs: mode 0 + frames; mode 1 + frame bodies (before CRC and COBS).
    let frames: Vec<Vec<u8>> = rs.iter().map(|r| wire::encode_reading_cobs(r).unwrap()).collect();
    let mut seeds: Vec<Vec<u8>> = frames.iter().map(|f| cat(&[&[0, 63], f])).collect();
    seeds.push(cat(&[&[0, 5], &frames.concat()]));
    let ack = wire::encode_ack_cobs(&edge_gateway::Ack { device: "wrist-01".into(), seq: 9, boot: Some(4) }).unwrap();
    seeds.push(cat(&[&[0, 63], &ack]));
    for f in frames.iter().chain([&ack]) {
        let mut raw = f[..f.len() - 1].to_vec();
        let n = cobs::decode_in_place(&mut raw).unwrap();
        seeds.push(cat(&[&[1], &raw[..n - 4]]));
    }
    write("serial_cobs", &seeds);

    // BLE GATT characteristics, from src/source/ble/decode.rs's tests.
    write(
        "ble_heart_rate",
        &[
            vec![0x00, 72],
            vec![0x1F, 0x2C, 0x01, 0xE8, 0x03, 0x00, 0x04, 0x00, 0x02, 0x00, 0x03],
            vec![0x10, 60, 0x00, 0x04],
            vec![0x08, 60, 0x01],
            vec![0x01, 0x50],
        ],
    );
    write(
        "ble_thermometer",
        &[
            vec![0x00, 0x6C, 0x01, 0x00, 0xFF],
            vec![0x07, 0xDA, 0x03, 0x00, 0xFF, 0xEA, 0x07, 11, 26, 12, 30, 15, 0x02],
            vec![0x00, 0xFF, 0xFF, 0x7F, 0x00],
            vec![0x02, 0x6C, 0x01, 0x00, 0xFF, 0xEA, 0x07, 13, 1, 0, 0, 0],
        ],
    );
    write("ble_battery", &[vec![87], vec![100], vec![101]]);

    // BTHome, from src/source/ble/bthome.rs's tests.
    write(
        "bthome_plain",
        &[
            vec![0x40, 0x02, 0xCA, 0x09, 0x03, 0xBF, 0x13],
            vec![0x40, 0x04, 0x13, 0x8A, 0x01],
            vec![0x40, 0x3F, 0x02, 0x0C],
            vec![0x40, 0x45, 0x11, 0x01],
            vec![0x40, 0x5D, 0x67, 0xFE],
            vec![0x40, 0x58, 0x24],
            vec![0x44, 0x00, 3, 0x02, 0x10, 0x00, 0x02, 0x20, 0x00, 0x53, 2, b'h', b'i', 0x01, 80],
            vec![0x40, 0x01, 80, 0xEE, 1, 2, 3],
            vec![0x40, 0x54, 5, 1],
            vec![0x20, 0x01, 1],
        ],
    );
    let objects: [&[u8]; 4] =
        [&[0x02, 0xCA, 0x09, 0x03, 0xBF, 0x13], &[0x00, 7, 0x01, 50], &[0x01, 42], &[0x53, 2, b'h', b'i', 0x01, 80]];
    let mut seeds: Vec<Vec<u8>> =
        objects.iter().map(|o| cat(&[&[0], &bthome::encrypt(o, MAC, &BINDKEY, 0x3322_1100)])).collect();
    seeds.extend(objects.iter().map(|o| cat(&[&[1], o])));
    let mut with_mac = bthome::encrypt_with_info(&[0x01, 42], MAC, &BINDKEY, 5, 0x43);
    with_mac.splice(1..1, MAC.iter().rev().copied());
    seeds.push(cat(&[&[0], &with_mac]));
    write("bthome_encrypted", &seeds);

    // LAN MQTT: topic, newline, payload (src/wire.rs's tests).
    write(
        "lan_mqtt",
        &[
            b"sensors/wrist-07/spo2\n{\"seq\":12,\"ts\":5,\"value\":97}".to_vec(),
            b"sensors/w/acc\n{\"value\":[1,2]}".to_vec(),
            b"sensors/w/s\n{\"device\":\"w\",\"value\":1}".to_vec(),
            b"sensors/w/s\n{\"device\":\"other\",\"value\":1}".to_vec(),
            b"other/topic\n97".to_vec(),
        ],
    );

    // The uplink's decoder: what a broker sends.
    let mut seeds = Vec::new();
    for (mode, protocol) in [(0u8, Protocol::V311), (1u8, Protocol::V5)] {
        let mut pkts: Vec<Vec<u8>> = vec![
            if protocol == Protocol::V5 { vec![0x20, 3, 1, 0, 0] } else { vec![0x20, 2, 1, 0] },
            vec![0x90, 3, 0, 1, 2],
            vec![0xD0, 0],
        ];
        let batch = Batch { gateway: "gw".into(), batch: 7, readings: rs.clone() }.encode(Format::Json);
        for (qos, dup) in [(0, false), (1, false), (2, true)] {
            let mut out = Vec::new();
            codec::encode_publish(protocol, "gateways/gw/readings", &batch, qos, false, dup, 42, &mut out);
            pkts.push(out);
        }
        for f in [codec::encode_pubrec, codec::encode_pubrel, codec::encode_pubcomp, codec::encode_puback] {
            let mut out = Vec::new();
            f(513, &mut out);
            pkts.push(out);
        }
        for p in &pkts {
            seeds.push(cat(&[&[mode], p]));
        }
        seeds.push(cat(&[&[mode], &pkts.concat()]));
    }
    write("uplink_codec", &seeds);

    // The front door: a CONNECT, then PUBLISHes into the ingest pattern.
    let mut seeds = Vec::new();
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut connect = Vec::new();
        codec::encode_connect(&Connect::anonymous(protocol, "site1/dev1", 30), &mut connect);
        let mut login = Vec::new();
        let mut c = Connect::anonymous(protocol, "lan-dev", 0);
        c.username = Some("sensor");
        c.password = Some(b"secret");
        c.will = Some(codec::Will { topic: "sensors/lan-dev/status", payload: b"gone", qos: 1, retain: false });
        codec::encode_connect(&c, &mut login);
        let mut rest = Vec::new();
        for (qos, payload) in [
            (0, &b"{\"value\":97}"[..]),
            (1, b"{\"seq\":12,\"ts\":5,\"value\":97}"),
            (2, b"{\"seq\":13,\"value\":[1,2]}"),
        ] {
            codec::encode_publish(
                protocol,
                "sensors/lan-dev/hr",
                payload,
                qos,
                false,
                false,
                7 + qos as u16,
                &mut rest,
            );
        }
        codec::encode_pubrel(9, &mut rest);
        codec::encode_pingreq(&mut rest);
        codec::encode_disconnect(&mut rest);
        seeds.push(connect.clone());
        seeds.push(cat(&[&connect, &rest]));
        seeds.push(cat(&[&login, &rest]));
    }
    seeds.push(b"\x10\x0c\x00\x06MQIsdp\x03\x02\x00\x3c".to_vec());
    write("front_door", &seeds);

    // Batches as the uplink publishes them, both formats.
    let b = Batch { gateway: "powercut-gw".into(), batch: 1234, readings: rs.clone() };
    let empty = Batch { gateway: "g".into(), batch: 0, readings: vec![] };
    write(
        "batch_decode",
        &[b.encode(Format::Json), b.encode(Format::Postcard), empty.encode(Format::Postcard), b"  {}".to_vec()],
    );

    // Config files: the shipped ones and the rig's.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = Vec::new();
    for f in ["config/gateway.example.toml", "config/gateway.pi.toml", "config/demo.toml"] {
        seeds.push(std::fs::read(root.join(f)).unwrap());
    }
    let rig = std::fs::read_to_string(root.join("tests/powercut/gateway.toml.in")).unwrap();
    let rig = rig
        .replace("@PORT@", "1883")
        .replace("@BAUD@", "115200")
        .replace("@BATCH_BYTES@", "2KiB")
        .replace("@MAX_BYTES@", "16KiB")
        .replace("@WHEN_FULL@", "reject_new")
        .replace("@RECONNECT_MIN@", "200ms");
    seeds.push(rig.into_bytes());
    seeds.push(b"[gateway]\nid = \"gw\"\ndata_dir = \"/tmp/x\"\n[store]\nmax_bytes = 100000\n".to_vec());
    write("config_toml", &seeds);

    // The way down: mode 0 cloud commands, 1 jsonl answers, 2 raw COBS
    // answers, 3 COBS bodies, 4 LAN ack payloads.
    let mut seeds: Vec<Vec<u8>> = [
        &br#"{"id":"c-1","device":"wrist-01","name":"alert","args":{"level":2},"ttl":"10m"}"#[..],
        br#"{"id":42,"device":"wrist-01","name":"vibrate"}"#,
        br#"{"id":"c-3","device":"wrist-01","name":"x","ttl":"0s"}"#,
        br#"{"device":"wrist-01","name":"alert"}"#,
        br#"{"id":"","device":"bad id","name":""}"#,
    ]
    .iter()
    .map(|c| cat(&[&[0], c]))
    .collect();
    let ack = edge_gateway::route::CommandAck {
        device: "wrist-01".into(),
        id: "c-1".into(),
        ok: true,
        result: Some(serde_json::json!({"battery": 80})),
    };
    let nack = edge_gateway::route::CommandAck { ok: false, result: None, ..ack.clone() };
    for a in [&ack, &nack] {
        seeds.push(cat(&[&[1, 63], &wire::encode_command_ack_jsonl(a)]));
        let f = wire::encode_command_ack(edge_gateway::config::Framing::Cobs, a).unwrap();
        seeds.push(cat(&[&[2, 63], &f]));
        let mut raw = f[..f.len() - 1].to_vec();
        let n = cobs::decode_in_place(&mut raw).unwrap();
        seeds.push(cat(&[&[3], &raw[..n - 4]]));
    }
    seeds.push(cat(&[&[1, 7], &wire::encode_reading_jsonl(&rs[0]), b"{\"cmd_ack\":{\"id\":1}}\n"]));
    seeds.push(cat(&[&[4], br#"{"id":"c-1","ok":true,"result":"done"}"#]));
    seeds.push(cat(&[&[4], br#"{"id":"c-1","ok":"yes"}"#]));
    write("downlink", &seeds);
}

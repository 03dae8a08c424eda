//! The MQTT packets the uplink sends and receives, for 3.1.1 and 5.
//!
//! Only what a QoS 1/2 publisher needs: CONNECT, PUBLISH, PUBREL, PINGREQ
//! and DISCONNECT out; CONNACK, PUBACK, PUBREC, PUBCOMP, PINGRESP and
//! DISCONNECT in (plus SUBSCRIBE/SUBACK and the receiver side of QoS 2, so
//! a test subscriber can be written with the same code). Owning the codec
//! keeps every byte the uplink writes under its control: the DUP flag, the
//! packet id, and when a packet goes out relative to what is on disk.

/// Which MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    #[error("remaining length over 256 MiB")]
    TooLong,
    #[error("unexpected packet type {0}")]
    UnknownType(u8),
}

pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
}

pub struct Connect<'a> {
    pub protocol: Protocol,
    pub client_id: &'a str,
    pub keep_alive_secs: u16,
    pub clean_start: bool,
    /// MQTT 5 only: how long the broker keeps the session after a disconnect.
    pub session_expiry_secs: u32,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

impl<'a> Connect<'a> {
    /// A clean-session CONNECT without will or login (the demo's LAN
    /// sensors, bench clients).
    pub fn anonymous(protocol: Protocol, client_id: &'a str, keep_alive_secs: u16) -> Self {
        Connect {
            protocol,
            client_id,
            keep_alive_secs,
            clean_start: true,
            session_expiry_secs: 0,
            will: None,
            username: None,
            password: None,
        }
    }
}

/// What a CONNACK said. Limits are `None` when the server sent none (MQTT
/// 3.1.1 never does).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// 3.1.1 return code or MQTT 5 reason code; 0 = accepted.
    pub code: u8,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    /// Server Keep Alive (0x13): the keep-alive the client must use instead of its own.
    pub server_keep_alive: Option<u16>,
    pub reason_string: Option<String>,
    /// The reply was 2 bytes long: a 3.1.1-style CONNACK (a pre-5 broker
    /// answering a v5 CONNECT says "unacceptable protocol version" this way).
    pub short_form: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pid: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    ConnAck(ConnAck),
    Publish(Publish),
    /// PUBACK / PUBREC / PUBREL / PUBCOMP: packet id and reason (0 under 3.1.1).
    PubAck {
        pid: u16,
        reason: u8,
    },
    PubRec {
        pid: u16,
        reason: u8,
    },
    PubRel {
        pid: u16,
        reason: u8,
    },
    PubComp {
        pid: u16,
        reason: u8,
    },
    SubAck {
        pid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    PingReq,
    Disconnect {
        reason: u8,
    },
}

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

// MQTT 5 property identifiers used here.
const P_SESSION_EXPIRY: u8 = 0x11;
const P_RECEIVE_MAXIMUM: u8 = 0x21;
const P_MAXIMUM_QOS: u8 = 0x24;
const P_RETAIN_AVAILABLE: u8 = 0x25;
const P_MAXIMUM_PACKET_SIZE: u8 = 0x27;
const P_REASON_STRING: u8 = 0x1F;
const P_SERVER_KEEP_ALIVE: u8 = 0x13;

/// MQTT's variable byte integer (remaining length, property lengths).
pub fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Fixed header + body.
fn frame(out: &mut Vec<u8>, first: u8, body: &[u8]) {
    out.push(first);
    put_varint(out, body.len());
    out.extend_from_slice(body);
}

pub fn encode_connect(c: &Connect, out: &mut Vec<u8>) {
    let mut b = Vec::with_capacity(64);
    put_str(&mut b, b"MQTT");
    b.push(if c.protocol == Protocol::V5 { 5 } else { 4 });
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.min(2) << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    b.push(flags);
    b.extend_from_slice(&c.keep_alive_secs.to_be_bytes());
    if c.protocol == Protocol::V5 {
        let mut props = vec![P_SESSION_EXPIRY];
        props.extend_from_slice(&c.session_expiry_secs.to_be_bytes());
        put_varint(&mut b, props.len());
        b.extend_from_slice(&props);
    }
    put_str(&mut b, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        if c.protocol == Protocol::V5 {
            b.push(0); // no will properties
        }
        put_str(&mut b, w.topic.as_bytes());
        put_str(&mut b, w.payload);
    }
    if let Some(u) = c.username {
        put_str(&mut b, u.as_bytes());
    }
    if let Some(p) = c.password {
        put_str(&mut b, p);
    }
    frame(out, CONNECT << 4, &b);
}

/// Size on the wire of a PUBLISH (to compare with the server's maximum packet size).
pub fn publish_len(protocol: Protocol, topic: &str, qos: u8, payload_len: usize) -> usize {
    let body = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(protocol == Protocol::V5) + payload_len;
    1 + varint_len(body) + body
}

#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    protocol: Protocol,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    dup: bool,
    pid: u16,
    out: &mut Vec<u8>,
) {
    let first = (PUBLISH << 4) | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain);
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(protocol == Protocol::V5) + payload.len();
    out.reserve(1 + varint_len(len) + len);
    out.push(first);
    put_varint(out, len);
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pid.to_be_bytes());
    }
    if protocol == Protocol::V5 {
        out.push(0); // no properties
    }
    out.extend_from_slice(payload);
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP with reason 0 (same bytes in 3.1.1 and 5:
/// MQTT 5 lets a success code without properties be left out).
fn encode_ack(kind: u8, pid: u16, out: &mut Vec<u8>) {
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    frame(out, (kind << 4) | flags, &pid.to_be_bytes());
}

pub fn encode_pubrel(pid: u16, out: &mut Vec<u8>) {
    encode_ack(PUBREL, pid, out)
}
pub fn encode_puback(pid: u16, out: &mut Vec<u8>) {
    encode_ack(PUBACK, pid, out)
}
pub fn encode_pubrec(pid: u16, out: &mut Vec<u8>) {
    encode_ack(PUBREC, pid, out)
}
pub fn encode_pubcomp(pid: u16, out: &mut Vec<u8>) {
    encode_ack(PUBCOMP, pid, out)
}

pub fn encode_pingreq(out: &mut Vec<u8>) {
    out.extend_from_slice(&[PINGREQ << 4, 0]);
}

pub fn encode_disconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(&[DISCONNECT << 4, 0]);
}

/// One topic filter at `qos`.
pub fn encode_subscribe(protocol: Protocol, pid: u16, filter: &str, qos: u8, out: &mut Vec<u8>) {
    let mut b = pid.to_be_bytes().to_vec();
    if protocol == Protocol::V5 {
        b.push(0);
    }
    put_str(&mut b, filter.as_bytes());
    b.push(qos);
    frame(out, (SUBSCRIBE << 4) | 0x02, &b);
}

/// Decode one packet from the front of `buf`: `Ok(None)` when more bytes are
/// needed, else the packet and how many bytes it took.
pub fn decode(protocol: Protocol, buf: &[u8], max_len: usize) -> Result<Option<(Packet, usize)>, CodecError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(CodecError::TooLong);
        }
    }
    if len > max_len {
        return Err(CodecError::TooLong);
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let body = &buf[i..i + len];
    let first = buf[0];
    let p = parse(protocol, first, body)?;
    Ok(Some((p, i + len)))
}

fn parse(protocol: Protocol, first: u8, b: &[u8]) -> Result<Packet, CodecError> {
    let pid = |name| b.get(..2).map(|x| u16::from_be_bytes([x[0], x[1]])).ok_or(CodecError::Malformed(name));
    let reason = || if protocol == Protocol::V5 { b.get(2).copied().unwrap_or(0) } else { 0 };
    Ok(match first >> 4 {
        CONNACK => Packet::ConnAck(parse_connack(b)?),
        PUBACK => Packet::PubAck { pid: pid("PUBACK")?, reason: reason() },
        PUBREC => Packet::PubRec { pid: pid("PUBREC")?, reason: reason() },
        PUBREL => Packet::PubRel { pid: pid("PUBREL")?, reason: reason() },
        PUBCOMP => Packet::PubComp { pid: pid("PUBCOMP")?, reason: reason() },
        PINGRESP => Packet::PingResp,
        PINGREQ => Packet::PingReq,
        DISCONNECT => {
            Packet::Disconnect { reason: if protocol == Protocol::V5 { b.first().copied().unwrap_or(0) } else { 0 } }
        }
        SUBACK => {
            let pid = pid("SUBACK")?;
            let mut rest = &b[2..];
            if protocol == Protocol::V5 {
                let (plen, n) = read_varint(rest).ok_or(CodecError::Malformed("SUBACK"))?;
                rest = rest.get(n + plen..).ok_or(CodecError::Malformed("SUBACK"))?;
            }
            Packet::SubAck { pid, codes: rest.to_vec() }
        }
        PUBLISH => {
            let bad = CodecError::Malformed("PUBLISH");
            let qos = (first >> 1) & 3;
            let tlen = b.get(..2).map(|x| u16::from_be_bytes([x[0], x[1]]) as usize).ok_or(bad.clone())?;
            let topic = b.get(2..2 + tlen).ok_or(bad.clone())?;
            let topic = String::from_utf8(topic.to_vec()).map_err(|_| bad.clone())?;
            let mut at = 2 + tlen;
            let mut pid = 0;
            if qos > 0 {
                let x = b.get(at..at + 2).ok_or(bad.clone())?;
                pid = u16::from_be_bytes([x[0], x[1]]);
                at += 2;
            }
            if protocol == Protocol::V5 {
                let (plen, n) = read_varint(b.get(at..).ok_or(bad.clone())?).ok_or(bad.clone())?;
                at += n + plen;
            }
            Packet::Publish(Publish {
                topic,
                qos,
                retain: first & 1 == 1,
                dup: first & 0x08 != 0,
                pid,
                payload: b.get(at..).ok_or(bad)?.to_vec(),
            })
        }
        t => return Err(CodecError::UnknownType(t)),
    })
}

fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    for (i, &x) in b.iter().enumerate().take(4) {
        n |= ((x & 0x7f) as usize) << (7 * i);
        if x & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

fn parse_connack(b: &[u8]) -> Result<ConnAck, CodecError> {
    let bad = CodecError::Malformed("CONNACK");
    if b.len() < 2 {
        return Err(bad);
    }
    let mut c = ConnAck { session_present: b[0] & 1 == 1, code: b[1], short_form: b.len() == 2, ..Default::default() };
    if b.len() > 2 {
        let (plen, n) = read_varint(&b[2..]).ok_or(bad.clone())?;
        let mut p = b.get(2 + n..2 + n + plen).ok_or(bad.clone())?;
        while let Some((&id, rest)) = p.split_first() {
            let size = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
                0x13 | 0x21 | 0x22 | 0x23 => 2,
                0x02 | 0x11 | 0x18 | 0x27 => 4,
                0x0B => read_varint(rest).ok_or(bad.clone())?.1,
                0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                    2 + rest.get(..2).map(|x| u16::from_be_bytes([x[0], x[1]]) as usize).ok_or(bad.clone())?
                }
                0x26 => {
                    let k = rest.get(..2).map(|x| u16::from_be_bytes([x[0], x[1]]) as usize).ok_or(bad.clone())?;
                    let v =
                        rest.get(2 + k..4 + k).map(|x| u16::from_be_bytes([x[0], x[1]]) as usize).ok_or(bad.clone())?;
                    4 + k + v
                }
                _ => return Err(bad),
            };
            let v = rest.get(..size).ok_or(bad.clone())?;
            match id {
                P_RECEIVE_MAXIMUM => c.receive_maximum = Some(u16::from_be_bytes([v[0], v[1]])),
                P_MAXIMUM_PACKET_SIZE => c.maximum_packet_size = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
                P_MAXIMUM_QOS => c.maximum_qos = Some(v[0]),
                P_RETAIN_AVAILABLE => c.retain_available = Some(v[0] == 1),
                P_SERVER_KEEP_ALIVE => c.server_keep_alive = Some(u16::from_be_bytes([v[0], v[1]])),
                P_REASON_STRING => c.reason_string = Some(String::from_utf8_lossy(&v[2..]).into_owned()),
                _ => {}
            }
            p = &rest[size..];
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(protocol: Protocol, bytes: &[u8]) -> Packet {
        let (p, n) = decode(protocol, bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        p
    }

    #[test]
    fn publish_round_trips_with_dup_qos_and_pid_in_both_versions() {
        for proto in [Protocol::V311, Protocol::V5] {
            let payload = vec![7u8; 300]; // two-byte remaining length
            let mut out = Vec::new();
            encode_publish(proto, "gateways/gw/readings", &payload, 2, false, true, 4242, &mut out);
            assert_eq!(out.len(), publish_len(proto, "gateways/gw/readings", 2, 300));
            assert_eq!(out[0], 0x3C, "PUBLISH, DUP, QoS 2");
            let Packet::Publish(p) = one(proto, &out) else { panic!() };
            assert_eq!(
                (p.topic.as_str(), p.qos, p.dup, p.pid, p.payload),
                ("gateways/gw/readings", 2, true, 4242, payload)
            );
        }
    }

    #[test]
    fn connect_bytes_match_the_spec_example_layout() {
        let mut out = Vec::new();
        let c = Connect {
            protocol: Protocol::V311,
            client_id: "gw",
            keep_alive_secs: 30,
            clean_start: false,
            session_expiry_secs: 0,
            will: Some(Will { topic: "s", payload: b"offline", qos: 1, retain: true }),
            username: Some("u"),
            password: Some(b"p"),
        };
        encode_connect(&c, &mut out);
        // 0x10, len, "MQTT", level 4, flags: user|pass|will retain|will qos 1|will
        assert_eq!(&out[..12], &[0x10, (out.len() - 2) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xEC, 0, 30]);
        let mut v5 = Vec::new();
        encode_connect(&Connect { protocol: Protocol::V5, session_expiry_secs: 0xFFFF_FFFF, ..c }, &mut v5);
        assert_eq!(&v5[8..18], &[5, 0xEC, 0, 30, 5, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn connack_v5_properties_are_read_and_unknown_ones_skipped() {
        // session present, success, props: receive max 20, user property, max packet 1000, reason string "ok",
        // server keep alive 7, retain available 0
        let mut props = vec![
            0x21, 0, 20, 0x26, 0, 1, b'k', 0, 1, b'v', 0x27, 0, 0, 3, 0xE8, 0x1F, 0, 2, b'o', b'k', 0x13, 0, 7, 0x25, 0,
        ];
        let mut body = vec![1, 0];
        put_varint(&mut body, props.len());
        body.append(&mut props);
        let mut out = Vec::new();
        frame(&mut out, CONNACK << 4, &body);
        let Packet::ConnAck(c) = one(Protocol::V5, &out) else { panic!() };
        assert!(c.session_present && !c.short_form);
        assert_eq!((c.code, c.receive_maximum, c.maximum_packet_size), (0, Some(20), Some(1000)));
        assert_eq!(c.reason_string.as_deref(), Some("ok"));
        assert_eq!((c.server_keep_alive, c.retain_available), (Some(7), Some(false)));
        // A 3.1.1 broker refusing a v5 CONNECT: 2 bytes, code 1.
        let Packet::ConnAck(c) = one(Protocol::V5, &[0x20, 2, 0, 1]) else { panic!() };
        assert!(c.short_form && c.code == 1);
    }

    #[test]
    fn acks_carry_reason_codes_only_under_v5() {
        assert_eq!(one(Protocol::V5, &[0x50, 3, 0, 9, 0x97]), Packet::PubRec { pid: 9, reason: 0x97 });
        assert_eq!(one(Protocol::V5, &[0x50, 2, 0, 9]), Packet::PubRec { pid: 9, reason: 0 });
        assert_eq!(one(Protocol::V311, &[0x70, 2, 1, 0]), Packet::PubComp { pid: 256, reason: 0 });
        let mut out = Vec::new();
        encode_pubrel(513, &mut out);
        assert_eq!(out, [0x62, 2, 2, 1]);
    }

    #[test]
    fn partial_input_asks_for_more_and_garbage_is_an_error() {
        let mut out = Vec::new();
        encode_publish(Protocol::V5, "t", &[1; 200], 1, false, false, 1, &mut out);
        for cut in 0..out.len() {
            assert_eq!(decode(Protocol::V5, &out[..cut], 1 << 20).unwrap(), None, "cut at {cut}");
        }
        assert!(decode(Protocol::V5, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 1], 1 << 20).is_err());
        assert!(decode(Protocol::V5, &[0x00, 0], 1 << 20).is_err());
        assert!(decode(Protocol::V5, &[0x20, 1, 0], 1 << 20).is_err());
        assert_eq!(decode(Protocol::V5, &out, 10), Err(CodecError::TooLong));
    }
}

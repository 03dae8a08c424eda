//! MQTT 3.1.1 clients, spoken for in MQTT 5 towards rumqttd.
//!
//! rumqttd 0.20 keeps one message log for both protocols, and its 3.1.1
//! connections panic (`unreachable!` in `protocol::v4::write`) when they
//! are handed a message published with MQTT 5 properties (a user property,
//! a content type): the subscriber's link dies, and every later CONNECT
//! with its client id panics again on a dead will channel until rumqttd is
//! restarted. Any LAN client could do that to every 3.1.1 dashboard. So
//! the front door connects every client to rumqttd's MQTT 5 listener and
//! translates a 3.1.1 client's packets here, packet by packet; the
//! [`super::acl::Gate`] and the rest of the door still see the client's
//! own protocol.
//!
//! Up (client → rumqttd): PUBLISH, SUBSCRIBE and UNSUBSCRIBE get an empty
//! property list; everything else is the same bytes in both protocols
//! (an ack of remaining length 2 means success in MQTT 5).
//! Down (rumqttd → client): properties and reason codes are dropped, a
//! failure in a SUBACK becomes 0x80, CONNACK reason codes map to 3.1.1
//! return codes, and a server DISCONNECT or AUTH (no such thing in 3.1.1)
//! is not sent.

use super::acl::wire::{packet, publish_head, varint};
use std::borrow::Cow;

/// `p` with an empty MQTT 5 property list inserted at `at`.
fn with_empty_properties(p: &[u8], header: usize, at: usize) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(p.len() + 1);
    body.extend_from_slice(p.get(header..at)?);
    body.push(0);
    body.extend_from_slice(p.get(at..)?);
    Some(packet(p[0], &body))
}

/// `p` without the MQTT 5 property list that starts at `at`.
fn without_properties(p: &[u8], header: usize, at: usize) -> Option<Vec<u8>> {
    let mut end = at;
    let len = varint(p, &mut end)?;
    let mut body = p.get(header..at)?.to_vec();
    body.extend_from_slice(p.get(end + len..)?);
    Some(packet(p[0], &body))
}

/// One whole 3.1.1 packet from the client, as MQTT 5. A packet that cannot
/// be read goes as it is (rumqttd then closes the connection).
pub fn up(p: &[u8], header: usize) -> Cow<'_, [u8]> {
    let kind = p[0] >> 4;
    let at = match kind {
        3 => match publish_head(p, header) {
            Some((_, _, at)) => at,
            None => return p.into(),
        },
        8 | 10 => header + 2,
        _ => return p.into(),
    };
    if at > p.len() {
        return p.into();
    }
    with_empty_properties(p, header, at).map_or(p.into(), Cow::Owned)
}

/// Every whole packet in `bytes` (3.1.1, from the client or answered in
/// its name), as MQTT 5.
pub fn up_all(bytes: &[u8]) -> Cow<'_, [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut changed = false;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let super::proxy::Frame::Len { total, header } = super::proxy::frame_len(rest) else { break };
        let Some(p) = rest.get(..total) else { break };
        let t = up(p, header);
        changed |= matches!(t, Cow::Owned(_));
        out.extend_from_slice(&t);
        at += total;
    }
    if !changed || at < bytes.len() {
        return bytes.into();
    }
    out.into()
}

/// MQTT 5 CONNACK reason code → 3.1.1 return code.
pub fn connack_code(reason: u8) -> u8 {
    match reason {
        0x00 => 0,
        0x84 => 1,
        0x85 => 2,
        0x86 => 4,
        0x87 | 0x8C => 5,
        _ => 3,
    }
}

/// One whole MQTT 5 packet from rumqttd, as 3.1.1 for the client; None
/// when 3.1.1 has no such packet (server DISCONNECT, AUTH) or it cannot be
/// read.
pub fn down(p: &[u8], header: usize) -> Option<Cow<'_, [u8]>> {
    let kind = p[0] >> 4;
    Some(match kind {
        2 => Cow::Owned(vec![0x20, 2, *p.get(header)? & 1, connack_code(*p.get(header + 1)?)]),
        3 => Cow::Owned(without_properties(p, header, publish_head(p, header)?.2)?),
        4..=7 => Cow::Owned(vec![p[0], 2, *p.get(header)?, *p.get(header + 1)?]),
        9 => {
            let mut at = header + 2;
            let len = varint(p, &mut at)?;
            let mut body = p.get(header..header + 2)?.to_vec();
            body.extend(p.get(at + len..)?.iter().map(|c| if *c < 0x80 { *c } else { 0x80 }));
            Cow::Owned(packet(p[0], &body))
        }
        11 => Cow::Owned(vec![0xb0, 2, *p.get(header)?, *p.get(header + 1)?]),
        14 | 15 => return None,
        _ => Cow::Borrowed(p),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(p: &[u8]) -> usize {
        match super::super::proxy::frame_len(p) {
            super::super::proxy::Frame::Len { header, .. } => header,
            _ => panic!("not a packet: {p:?}"),
        }
    }

    #[test]
    fn a_publish_goes_up_with_empty_properties_and_comes_down_without_them() {
        // QoS 1 "a/b" id 7, payload "hi".
        let v3 = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i'];
        let v5 = up(&v3, 2);
        assert_eq!(&v5[..], &[0x32, 10, 0, 3, b'a', b'/', b'b', 0, 7, 0, b'h', b'i']);
        // Down, with a user property ("k", "v") and a content type, loses them.
        let mut props = vec![0x26, 0, 1, b'k', 0, 1, b'v', 0x03, 0, 1, b't'];
        let mut body = vec![0, 3, b'a', b'/', b'b', 0, 7, props.len() as u8];
        body.append(&mut props);
        body.extend_from_slice(b"hi");
        let mut from_broker = vec![0x32, body.len() as u8];
        from_broker.extend_from_slice(&body);
        assert_eq!(&down(&from_broker, 2).unwrap()[..], &v3[..]);
        // QoS 0: no packet id.
        let q0 = [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'];
        let up0 = up(&q0, 2);
        assert_eq!(&up0[..], &[0x30, 8, 0, 3, b'a', b'/', b'b', 0, b'h', b'i']);
        assert_eq!(&down(&up0, header(&up0)).unwrap()[..], &q0[..]);
    }

    #[test]
    fn subscribe_unsubscribe_and_their_acks() {
        let sub = [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1];
        assert_eq!(&up(&sub, 2)[..], &[0x82, 9, 0, 1, 0, 0, 3, b'a', b'/', b'#', 1]);
        let unsub = [0xa2, 7, 0, 2, 0, 3, b'a', b'/', b'#'];
        assert_eq!(&up(&unsub, 2)[..], &[0xa2, 8, 0, 2, 0, 0, 3, b'a', b'/', b'#']);
        // SUBACK with a reason string property, granted 1 and refused 0x87.
        let suback = [0x90, 9, 0, 1, 4, 0x1f, 0, 1, b'x', 1, 0x87];
        assert_eq!(&down(&suback, 2).unwrap()[..], &[0x90, 4, 0, 1, 1, 0x80]);
        let unsuback = [0xb0, 4, 0, 2, 0, 0x00];
        assert_eq!(&down(&unsuback, 2).unwrap()[..], &[0xb0, 2, 0, 2]);
        // PUBACK with a reason code: the 3.1.1 client gets a plain one.
        assert_eq!(&down(&[0x40, 3, 0, 9, 0x10], 2).unwrap()[..], &[0x40, 2, 0, 9]);
        assert_eq!(&up(&[0x40, 2, 0, 9], 2)[..], &[0x40, 2, 0, 9]);
    }

    #[test]
    fn connack_and_v5_only_packets() {
        // Session present, success, properties (receive maximum 100).
        assert_eq!(&down(&[0x20, 6, 1, 0, 3, 0x21, 0, 100], 2).unwrap()[..], &[0x20, 2, 1, 0]);
        assert_eq!(&down(&[0x20, 3, 0, 0x85, 0], 2).unwrap()[..], &[0x20, 2, 0, 2]);
        assert_eq!(&down(&[0x20, 3, 0, 0x86, 0], 2).unwrap()[..], &[0x20, 2, 0, 4]);
        assert!(down(&[0xe0, 1, 0x8e], 2).is_none());
        assert_eq!(&down(&[0xd0, 0], 2).unwrap()[..], &[0xd0, 0]);
    }

    #[test]
    fn several_acks_at_once_go_up_unchanged_and_a_mixed_buffer_is_translated() {
        let acks = [0x40, 2, 0, 1, 0x50, 2, 0, 2];
        assert!(matches!(up_all(&acks), Cow::Borrowed(_)));
        let mixed = [0x40, 2, 0, 1, 0x30, 3, 0, 1, b'x'];
        assert_eq!(&up_all(&mixed)[..], &[0x40, 2, 0, 1, 0x30, 4, 0, 1, b'x', 0]);
    }
}

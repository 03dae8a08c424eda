//! Access control for the LAN broker: who may publish to and subscribe to what.
//!
//! Rules come from `[[broker.acl]]` (and, as sugar, from `publish = [...]`
//! on `[[broker.users]]`). Each rule names who it is for (`user` and/or
//! `client_id`, exact or a `*` glob; neither = everyone, anonymous clients
//! included), a `topic` (an MQTT filter in which `%u` and `%c` stand for
//! the client's user name and client id, as in Mosquitto's `pattern`
//! lines), an `access` (`publish`, `subscribe`, `readwrite`) and a
//! `permission` (`allow`, `deny`). The first rule that applies to the
//! client, covers the access and matches the topic decides. When none does:
//! deny if any `[[broker.acl]]` rule is configured, else allow (the
//! behaviour before ACLs existed).
//!
//! A user's `publish = ["p1", "p2"]` becomes, at the top of the list:
//! allow publish to topics starting with `p1` (a string prefix, as it always
//! was), the same for `p2`, then deny publish to `#`, all for that user.
//!
//! This module is pure: the front door ([`super::proxy`]) compiles a
//! [`ClientAcl`] per connection and asks it
//! * [`ClientAcl::may_publish`] for every PUBLISH and the will;
//! * [`ClientAcl::subscribe`] for every filter of a SUBSCRIBE: [`Sub::Grant`]
//!   when every topic the filter can match is readable, [`Sub::Deny`] when
//!   none is, [`Sub::Partial`] in between (granted, and the front door drops
//!   what the client may not read);
//! * [`ClientAcl::may_read`] for every PUBLISH rumqttd sends the client (so
//!   `#` by a client allowed only `ward-3/#` delivers only `ward-3/…`, and
//!   retained messages obey the subscribe ACL too).
//!
//! A client whose user name or client id contains `+` or `#` may do nothing
//! at all when a rule substitutes that name (`%u` / `%c`): substituted, it
//! would widen the rule (Mosquitto refuses such clients the same way).

use super::config::{AclAccess, AclPermission, BrokerConfig, DeniedPublish};
use crate::allow::{Devices, glob};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One level of a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Lit(String),
    Plus,
    Hash,
}

/// A parsed MQTT topic filter (`a/+/#`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Level>);

/// Why a string is not a topic filter.
pub fn check_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("an empty topic filter".into());
    }
    if f.len() > 65_535 {
        return Err("a topic filter is at most 65535 bytes".into());
    }
    if f.contains('\0') {
        return Err("NUL in a topic filter".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!("{f:?}: '#' must be a whole level and the last one"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("{f:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

impl Filter {
    /// Parse a filter (see [`check_filter`]).
    pub fn parse(f: &str) -> Result<Filter, String> {
        check_filter(f)?;
        Ok(Filter(
            f.split('/')
                .map(|l| match l {
                    "+" => Level::Plus,
                    "#" => Level::Hash,
                    l => Level::Lit(l.to_string()),
                })
                .collect(),
        ))
    }

    /// Does `topic` match? Topics starting with `$` match no filter that
    /// starts with a wildcard (MQTT 3.1.1 §4.7.2).
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('/');
        for (i, level) in self.0.iter().enumerate() {
            match level {
                Level::Hash => return !(i == 0 && topic.starts_with('$')),
                Level::Plus => match parts.next() {
                    Some(p) if i == 0 && p.starts_with('$') => return false,
                    Some(_) => {}
                    None => return false,
                },
                Level::Lit(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Is every topic that matches `self` matched by `other` too?
    pub fn subset_of(&self, other: &Filter) -> bool {
        let (a, b) = (&self.0, &other.0);
        for i in 0.. {
            match (a.get(i), b.get(i)) {
                (None, None) => return true,
                // `x` ⊆ `x/#` (`#` also matches the parent level).
                (None, Some(Level::Hash)) => return b.len() == i + 1,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(x), Some(Level::Hash)) => return !(i == 0 && dollar(x)),
                (Some(Level::Hash), Some(_)) => return false,
                (Some(Level::Plus), Some(Level::Plus)) => {}
                (Some(Level::Plus), Some(Level::Lit(_))) => return false,
                (Some(Level::Lit(x)), Some(Level::Plus)) if i == 0 && x.starts_with('$') => return false,
                (Some(Level::Lit(_)), Some(Level::Plus)) => {}
                (Some(Level::Lit(x)), Some(Level::Lit(y))) if x == y => {}
                (Some(Level::Lit(_)), Some(Level::Lit(_))) => return false,
            }
        }
        unreachable!()
    }

    /// Is there a topic both filters match?
    pub fn overlaps(&self, other: &Filter) -> bool {
        let (a, b) = (&self.0, &other.0);
        for i in 0.. {
            match (a.get(i), b.get(i)) {
                (None, None) => return true,
                (None, Some(Level::Hash)) | (Some(Level::Hash), None) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(Level::Hash), Some(y)) | (Some(y), Some(Level::Hash)) => return !(i == 0 && dollar(y)),
                (Some(Level::Plus), Some(y)) | (Some(y), Some(Level::Plus)) => {
                    if i == 0 && dollar(y) {
                        return false;
                    }
                }
                (Some(Level::Lit(x)), Some(Level::Lit(y))) if x == y => {}
                (Some(Level::Lit(_)), Some(Level::Lit(_))) => return false,
            }
        }
        unreachable!()
    }
}

fn dollar(l: &Level) -> bool {
    matches!(l, Level::Lit(x) if x.starts_with('$'))
}

/// What a rule's topic is.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    /// An MQTT filter, possibly with `%u`/`%c` in it.
    Filter(String),
    /// A string prefix (from `[[broker.users]] publish`).
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    user: Option<String>,
    client_id: Option<String>,
    /// Sugar rules name their user exactly, even with a `*` in the name.
    user_exact: bool,
    target: Target,
    publish: bool,
    subscribe: bool,
    allow: bool,
}

/// The whole rule list, shared by every connection; replaced on SIGHUP.
#[derive(Debug, Clone, PartialEq)]
pub struct Acl {
    rules: Vec<Rule>,
    default_allow: bool,
    /// `broker.denied_publish = "disconnect"`.
    pub disconnect_denied: bool,
    /// Who may speak for which devices (issue 19, H3).
    devices: DeviceRules,
}

/// `[[broker.users]] devices`, `broker.devices`, `broker.anonymous_devices`.
#[derive(Debug, Clone, PartialEq, Default)]
struct DeviceRules {
    per_user: std::collections::HashMap<String, Devices>,
    users: Option<Devices>,
    anonymous: Option<Devices>,
}

impl Acl {
    /// The rules `cfg` configures (already validated by the config).
    pub fn from_config(cfg: &BrokerConfig) -> Acl {
        let mut rules = Vec::new();
        for u in &cfg.users {
            let Some(prefixes) = &u.publish else { continue };
            let rule = |target, allow| Rule {
                user: Some(u.name.clone()),
                client_id: None,
                user_exact: true,
                target,
                publish: true,
                subscribe: false,
                allow,
            };
            rules.extend(prefixes.iter().map(|p| rule(Target::Prefix(p.clone()), true)));
            rules.push(rule(Target::Filter("#".into()), false));
        }
        for r in &cfg.acl {
            rules.push(Rule {
                user: r.user.clone(),
                client_id: r.client_id.clone(),
                user_exact: false,
                target: Target::Filter(r.topic.clone()),
                publish: matches!(r.access, AclAccess::Publish | AclAccess::Readwrite),
                subscribe: matches!(r.access, AclAccess::Subscribe | AclAccess::Readwrite),
                allow: r.permission == AclPermission::Allow,
            });
        }
        Acl {
            rules,
            default_allow: cfg.acl.is_empty(),
            disconnect_denied: cfg.denied_publish == DeniedPublish::Disconnect,
            devices: DeviceRules {
                per_user: cfg.users.iter().filter_map(|u| Some((u.name.clone(), u.devices.clone()?))).collect(),
                users: cfg.devices.clone(),
                anonymous: cfg.anonymous_devices.clone(),
            },
        }
    }

    /// The devices `user` (`None`: anonymous) may publish readings for;
    /// `None`: any.
    fn devices_of(&self, user: Option<&str>) -> Option<Devices> {
        let d = &self.devices;
        match user {
            None => d.anonymous.clone(),
            Some(u) => d.per_user.get(u).or(d.users.as_ref()).map(|l| l.for_user(u)),
        }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules that apply to this client, `%u`/`%c` substituted.
    pub fn compile(&self, user: Option<&str>, client_id: &str) -> Compiled {
        let mut rules = Vec::new();
        let mut dangerous = false;
        for r in &self.rules {
            let user_ok = match (&r.user, user) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(p), Some(u)) if r.user_exact => p == u,
                (Some(p), Some(u)) => glob(p, u),
            };
            if !user_ok || !r.client_id.as_deref().is_none_or(|p| glob(p, client_id)) {
                continue;
            }
            let target = match &r.target {
                Target::Prefix(p) => CTarget::Prefix(p.clone()),
                Target::Filter(f) => {
                    let mut t = f.clone();
                    if t.contains("%u") {
                        // An anonymous client has no name: the rule cannot apply.
                        let Some(u) = user else { continue };
                        dangerous |= u.contains(['+', '#']);
                        t = t.replace("%u", u);
                    }
                    if t.contains("%c") {
                        dangerous |= client_id.contains(['+', '#']);
                        t = t.replace("%c", client_id);
                    }
                    match Filter::parse(&t) {
                        Ok(f) => CTarget::Filter(f),
                        // Only a substitution can break a validated filter (e.g. an empty client id).
                        Err(_) => continue,
                    }
                }
            };
            rules.push(CRule { target, publish: r.publish, subscribe: r.subscribe, allow: r.allow });
        }
        Compiled {
            open: self.rules.is_empty() && self.default_allow,
            rules,
            default_allow: self.default_allow,
            dangerous,
            disconnect_denied: self.disconnect_denied,
            devices: self.devices_of(user),
        }
    }
}

#[derive(Debug, Clone)]
enum CTarget {
    Filter(Filter),
    Prefix(String),
}

impl CTarget {
    fn matches(&self, topic: &str) -> bool {
        match self {
            CTarget::Filter(f) => f.matches(topic),
            CTarget::Prefix(p) => topic.starts_with(p.as_str()),
        }
    }
    /// Every topic of `f` is in this target (false when unsure).
    fn covers(&self, f: &Filter) -> bool {
        match self {
            CTarget::Filter(g) => f.subset_of(g),
            // Only a filter without wildcards is surely inside a prefix.
            CTarget::Prefix(p) => literal(f).is_some_and(|t| t.starts_with(p.as_str())),
        }
    }
    /// Some topic of `f` may be in this target (true when unsure).
    fn touches(&self, f: &Filter) -> bool {
        match self {
            CTarget::Filter(g) => f.overlaps(g),
            CTarget::Prefix(p) => literal(f).is_none_or(|t| t.starts_with(p.as_str())),
        }
    }
}

/// The topic a filter without wildcards names.
fn literal(f: &Filter) -> Option<String> {
    let mut parts = Vec::with_capacity(f.0.len());
    for l in &f.0 {
        match l {
            Level::Lit(x) => parts.push(x.as_str()),
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

#[derive(Debug, Clone)]
struct CRule {
    target: CTarget,
    publish: bool,
    subscribe: bool,
    allow: bool,
}

/// What a SUBSCRIBE filter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Every topic the filter matches is readable.
    Grant,
    /// Some are, some are not (or we cannot tell): granted, and each
    /// message is checked with [`ClientAcl::may_read`] on its way out.
    Partial,
    /// None is: SUBACK failure for this filter.
    Deny,
}

/// The rules for one client.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// No rules and default allow: every check is true.
    open: bool,
    rules: Vec<CRule>,
    default_allow: bool,
    /// A `%u`/`%c` rule would have substituted a `+` or `#`: deny everything.
    dangerous: bool,
    disconnect_denied: bool,
    /// The devices this login may publish readings for; `None`: any.
    devices: Option<Devices>,
}

impl Compiled {
    /// May this login publish readings for `device` (issue 19, H3)?
    pub fn may_speak_for(&self, device: &str) -> bool {
        crate::allow::permits(self.devices.as_ref(), device)
    }

    fn first(&self, topic: &str, publish: bool) -> bool {
        if self.open {
            return true;
        }
        if self.dangerous {
            return false;
        }
        self.rules
            .iter()
            .find(|r| if publish { r.publish } else { r.subscribe } && r.target.matches(topic))
            .map_or(self.default_allow, |r| r.allow)
    }

    /// `broker.denied_publish = "disconnect"`.
    pub fn disconnect_denied(&self) -> bool {
        self.disconnect_denied
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        self.first(topic, true)
    }

    pub fn may_read(&self, topic: &str) -> bool {
        self.first(topic, false)
    }

    /// The verdict for a subscription filter (a `$share/group/` prefix is
    /// not part of what is read).
    pub fn subscribe(&self, filter: &str) -> Sub {
        if self.open {
            return Sub::Grant;
        }
        if self.dangerous {
            return Sub::Deny;
        }
        let f = match share_target(filter).map(Filter::parse) {
            Some(Ok(f)) => f,
            // Not a filter: rumqttd refuses it anyway.
            _ => return Sub::Deny,
        };
        // Walk the rules in order, as each topic of `f` would.
        let (mut allowed_before, mut denied_before) = (false, false);
        for r in self.rules.iter().filter(|r| r.subscribe) {
            if r.target.covers(&f) {
                // Every topic left is decided here.
                return match (r.allow, allowed_before, denied_before) {
                    (true, _, false) => Sub::Grant,
                    (false, false, _) => Sub::Deny,
                    _ => Sub::Partial,
                };
            }
            if r.target.touches(&f) {
                if r.allow {
                    allowed_before = true;
                } else {
                    denied_before = true;
                }
            }
        }
        match (self.default_allow, allowed_before, denied_before) {
            (true, _, false) => Sub::Grant,
            (false, false, _) => Sub::Deny,
            _ => Sub::Partial,
        }
    }
}

/// `$share/group/a/b` → `a/b`; other filters as they are.
fn share_target(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map(|(_, f)| f),
        None => Some(filter),
    }
}

/// `b` without what a reload applies at once (the ACL, `denied_publish`,
/// the users' `publish` prefixes): if two configs differ in this, the
/// broker needs a restart for the difference.
pub fn without_acl(b: &BrokerConfig) -> BrokerConfig {
    let mut b = b.clone();
    b.acl.clear();
    b.denied_publish = Default::default();
    b.devices = None;
    b.anonymous_devices = None;
    for u in &mut b.users {
        u.publish = None;
        u.devices = None;
    }
    b
}

/// The ACL in force: swapped by a reload, read by every connection.
#[derive(Debug)]
pub struct Store {
    current: RwLock<Arc<Acl>>,
    generation: AtomicU64,
}

impl Store {
    pub fn new(acl: Acl) -> Store {
        Store { current: RwLock::new(Arc::new(acl)), generation: AtomicU64::new(0) }
    }

    pub fn get(&self) -> Arc<Acl> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Put `acl` in force for every connection (their next check), if it differs.
    pub fn replace(&self, acl: Acl) -> bool {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        if **cur == acl {
            return false;
        }
        *cur = Arc::new(acl);
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// One connection's view: its compiled rules, recompiled after a reload.
pub struct ClientAcl {
    store: Arc<Store>,
    user: Option<String>,
    client_id: String,
    generation: u64,
    compiled: Compiled,
}

impl ClientAcl {
    pub fn new(store: Arc<Store>, user: Option<String>, client_id: String) -> ClientAcl {
        let generation = store.generation();
        let compiled = store.get().compile(user.as_deref(), &client_id);
        ClientAcl { store, user, client_id, generation, compiled }
    }

    /// The rules in force now.
    pub fn current(&mut self) -> &Compiled {
        let g = self.store.generation();
        if g != self.generation {
            self.generation = g;
            self.compiled = self.store.get().compile(self.user.as_deref(), &self.client_id);
        }
        &self.compiled
    }

    pub fn may_publish(&mut self, topic: &str) -> bool {
        self.current().may_publish(topic)
    }

    pub fn may_read(&mut self, topic: &str) -> bool {
        self.current().may_read(topic)
    }

    pub fn subscribe(&mut self, filter: &str) -> Sub {
        self.current().subscribe(filter)
    }

    /// True when a `+`/`#` in the user name or client id shut this client out.
    pub fn dangerous(&mut self) -> bool {
        self.current().dangerous
    }
}

/// rumqttd 0.20 matches no topic that starts with `$` and refuses such
/// filters; MQTT wants them, unmatched by filters that start with a
/// wildcard. So `$` topics (the gateway's `$SYS/edge-gateway/status`) live
/// inside rumqttd behind this prefix, which the front door adds and strips.
/// Clients may not use it themselves.
pub const DOLLAR: char = '\u{7f}';

/// The name rumqttd knows a topic (or filter) by.
pub fn internal_topic(t: &str) -> std::borrow::Cow<'_, str> {
    if t.starts_with('$') { format!("{DOLLAR}{t}").into() } else { t.into() }
}

/// What was denied, for the front door's metrics and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Publish(String),
    Subscribe(String),
}

/// What the front door does with one packet (see [`Gate`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Forward the packet as it is (true) or not at all / `rewritten` (false).
    pub forward: bool,
    /// Forward this instead of the packet.
    pub rewritten: Option<Vec<u8>>,
    /// Bytes to send back to where the packet came from.
    pub reply: Option<Vec<u8>>,
    pub denied: Vec<Denial>,
    /// A PUBLISH to the client that its read ACL filtered out.
    pub filtered: bool,
}

impl Verdict {
    fn pass() -> Verdict {
        Verdict { forward: true, ..Default::default() }
    }
}

/// The ACL between one client and rumqttd, packet by packet. Pure: the
/// front door feeds it whole packets and does what the [`Verdict`] says.
///
/// * Client → broker PUBLISH the client may not send: not forwarded. MQTT 5:
///   PUBACK/PUBREC 0x87; MQTT 3.1.1: a plain PUBACK/PUBREC (the client
///   cannot be told, and a retry loop helps nobody), its PUBREL answered
///   with PUBCOMP here. MQTT 5 topic aliases are resolved first.
/// * Client → broker SUBSCRIBE: denied filters are taken out (SUBACK 0x80 /
///   0x87 for them, spliced into rumqttd's SUBACK for the rest); a SUBSCRIBE
///   with no filter left is answered here.
/// * Broker → client PUBLISH the client may not read (a wildcard or an
///   existing subscription reaching further than the ACL): not forwarded,
///   acked to rumqttd on the client's behalf (PUBACK, or PUBREC and then
///   PUBCOMP for its PUBREL) so its in-flight window does not fill up. As
///   rumqttd disconnects a client whose acks come out of order, ours and
///   the client's are queued and go to rumqttd in the order it sent.
pub struct Gate {
    pub acl: ClientAcl,
    v5: bool,
    aliases: std::collections::HashMap<u16, String>,
    denied_qos2: std::collections::HashSet<u16>,
    dropped_qos2: std::collections::HashSet<u16>,
    pending_subs: std::collections::HashMap<u16, Vec<Option<u8>>>,
    /// rumqttd insists on acks in the order it sent: PUBACK/PUBREC in the
    /// order of its QoS 1/2 PUBLISHes, PUBCOMP in the order of its PUBRELs.
    /// Ours (for what we filtered) and the client's are queued here.
    acks: InOrder,
    comps: InOrder,
    /// The client's granted `$` filters: what rumqttd sends on `$` topics
    /// reaches the client only through one of these (not through `#`).
    dollar_subs: Vec<(String, Filter)>,
    /// rumqttd's topic aliases towards the client, and those the client knows.
    out_aliases: std::collections::HashMap<u16, String>,
    told_aliases: std::collections::HashMap<u16, String>,
    /// The client's Maximum Packet Size (MQTT 5 CONNECT), which rumqttd ignores.
    pub max_packet: Option<u32>,
    /// QoS 2 deliveries sent to the client at QoS 1 (published at 1): its
    /// PUBACK becomes our PUBREC to rumqttd.
    downgraded: std::collections::HashSet<u16>,
    /// The client's Receive Maximum (MQTT 5 CONNECT), which rumqttd ignores:
    /// QoS 1/2 PUBLISHes sent and not finished (id → the kind of the ack
    /// that finishes it), and those waiting for room.
    pub receive_max: Option<u16>,
    inflight_out: std::collections::HashMap<u16, u8>,
    parked: std::collections::VecDeque<(u16, u8, Vec<u8>)>,
    /// The Session Expiry Interval of the client's DISCONNECT, if any.
    pub disconnect_expiry: Option<u32>,
}

/// Acks owed to rumqttd, in the order it expects them.
#[derive(Default)]
struct InOrder(std::collections::VecDeque<(u16, Option<Vec<u8>>)>);

impl InOrder {
    /// rumqttd sent `id`; `ours` is the ack when we answer it ourselves.
    fn expect(&mut self, id: u16, ours: Option<Vec<u8>>) {
        self.0.push_back((id, ours));
    }

    /// The client acked `id` with `bytes`: false when nothing waits for it.
    fn client(&mut self, id: u16, bytes: &[u8]) -> bool {
        match self.0.iter_mut().find(|(i, b)| *i == id && b.is_none()) {
            Some(slot) => {
                slot.1 = Some(bytes.to_vec());
                true
            }
            None => false,
        }
    }

    /// The acks that may go now, in order.
    fn ready(&mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        while self.0.front().is_some_and(|(_, b)| b.is_some()) {
            out.extend(self.0.pop_front().and_then(|(_, b)| b).unwrap_or_default());
        }
        (!out.is_empty()).then_some(out)
    }
}

/// rumqttd's TOPIC_ALIAS_MAX: it disconnects a client using a bigger alias.
const MAX_ALIAS: u16 = 4096;
/// What a client's alias set on a denied PUBLISH resolves to: a topic with
/// the internal prefix, which no client may publish to.
const DENIED_ALIAS: &str = "\u{7f}denied";

/// MQTT 5 "not authorized".
const NOT_AUTHORIZED: u8 = 0x87;

impl Gate {
    pub fn new(acl: ClientAcl, v5: bool) -> Gate {
        Gate {
            acl,
            v5,
            aliases: Default::default(),
            denied_qos2: Default::default(),
            dropped_qos2: Default::default(),
            pending_subs: Default::default(),
            acks: Default::default(),
            comps: Default::default(),
            dollar_subs: Vec::new(),
            out_aliases: Default::default(),
            told_aliases: Default::default(),
            max_packet: None,
            downgraded: Default::default(),
            receive_max: None,
            inflight_out: Default::default(),
            parked: Default::default(),
            disconnect_expiry: None,
        }
    }

    /// The topic of a client's PUBLISH, its MQTT 5 alias resolved.
    pub fn resolve(&mut self, p: &wire::Publish) -> Option<String> {
        // Out of rumqttd's range: passed on, rumqttd ends the connection
        // (and this map stays within 4096 entries).
        if p.alias.is_some_and(|a| a == 0 || a > MAX_ALIAS) {
            return None;
        }
        match (p.topic.is_empty(), p.alias) {
            (false, Some(a)) => {
                self.aliases.insert(a, p.topic.clone());
                Some(p.topic.clone())
            }
            (false, None) => Some(p.topic.clone()),
            (true, Some(a)) => self.aliases.get(&a).cloned(),
            (true, None) => None,
        }
    }

    /// A whole packet from the client (`header`: its fixed header length).
    /// For a PUBLISH that may go on, also returns its (resolved) topic.
    pub fn from_client(&mut self, packet: &[u8], header: usize) -> (Verdict, Option<String>) {
        match packet[0] >> 4 {
            3 => {
                let Some(p) = wire::publish(packet, header, self.v5) else { return (Verdict::pass(), None) };
                // An unknown alias: rumqttd ends the connection (protocol error).
                let Some(topic) = self.resolve(&p) else { return (Verdict::pass(), None) };
                // `$` topics are the gateway's own.
                if !topic.starts_with(['$', DOLLAR]) && self.acl.may_publish(&topic) {
                    // MQTT 5: the QoS it was published with travels along (see wire::QOS_TAG).
                    if self.v5 && (p.qos < 2 || wire::qos_tag(packet, header).is_some()) {
                        let tag = (p.qos < 2).then_some(p.qos);
                        if let Some(r) = wire::publish_rebuilt(packet, header, None, p.qos, tag) {
                            return (Verdict { rewritten: Some(r), ..Default::default() }, Some(topic));
                        }
                    }
                    return (Verdict::pass(), Some(topic));
                }
                let reply = match (p.qos, p.id) {
                    (1, Some(id)) => Some(wire::ack(4, id, self.v5.then_some(NOT_AUTHORIZED))),
                    (2, Some(id)) => {
                        if !self.v5 {
                            self.denied_qos2.insert(id);
                        }
                        Some(wire::ack(5, id, self.v5.then_some(NOT_AUTHORIZED)))
                    }
                    _ => None,
                };
                // Remember a denied alias by a short marker (denied again), not its topic.
                if let Some(a) = p.alias {
                    self.aliases.insert(a, DENIED_ALIAS.to_string());
                }
                (Verdict { reply, denied: vec![Denial::Publish(topic)], ..Default::default() }, None)
            }
            // PUBREL for a QoS 2 PUBLISH we took in place of rumqttd.
            6 => match wire::packet_id(packet, header) {
                Some(id) if self.denied_qos2.remove(&id) => {
                    (Verdict { reply: Some(wire::ack(7, id, None)), ..Default::default() }, None)
                }
                _ => (Verdict::pass(), None),
            },
            8 => (self.subscribe(packet, header), None),
            10 => (self.unsubscribe(packet, header), None),
            // The client's PUBACK/PUBREC/PUBCOMP for what rumqttd sent: in order.
            k @ (4 | 5 | 7) => {
                let Some(id) = wire::packet_id(packet, header) else { return (Verdict::pass(), None) };
                // A delivery the client finished: room for a parked one.
                let failed = k == 5 && packet.get(header + 2).is_some_and(|r| *r >= 0x80);
                let released = if k != 5 || failed { self.finished(id, k) } else { None };
                // Sent at QoS 1 in place of 2: rumqttd gets the PUBREC, and
                // its PUBREL our PUBCOMP.
                let downgraded;
                let ack: &[u8] = if k == 4 && self.downgraded.remove(&id) {
                    self.dropped_qos2.insert(id);
                    downgraded = wire::ack(5, id, None);
                    &downgraded
                } else {
                    packet
                };
                let queue = if k == 7 { &mut self.comps } else { &mut self.acks };
                let v = match queue.client(id, ack) {
                    true => Verdict { rewritten: queue.ready(), ..Default::default() },
                    false => Verdict::pass(),
                };
                (Verdict { reply: released, ..v }, None)
            }
            // DISCONNECT: an MQTT 5 client may change its Session Expiry Interval.
            14 => {
                if self.v5 {
                    self.disconnect_expiry = wire::disconnect_expiry(packet, header).or(self.disconnect_expiry);
                }
                (Verdict::pass(), None)
            }
            _ => (Verdict::pass(), None),
        }
    }

    fn subscribe(&mut self, packet: &[u8], header: usize) -> Verdict {
        // Malformed: forwarded untouched, rumqttd closes the connection.
        let Some(sub) = wire::subscribe(packet, header, self.v5) else { return Verdict::pass() };
        let verdicts: Vec<Sub> = sub
            .filters
            .iter()
            .map(|(f, _)| if f.starts_with(DOLLAR) { Sub::Deny } else { self.acl.subscribe(f) })
            .collect();
        let dollar = |f: &str| f.starts_with('$') && !f.starts_with("$share/");
        for ((f, _), v) in sub.filters.iter().zip(&verdicts) {
            if *v != Sub::Deny
                && dollar(f)
                && let Ok(parsed) = Filter::parse(f)
            {
                self.dollar_subs.retain(|(x, _)| x != f);
                self.dollar_subs.push((f.clone(), parsed));
            }
        }
        let renamed = sub.filters.iter().any(|(f, _)| dollar(f));
        if !verdicts.contains(&Sub::Deny) {
            if !renamed {
                return Verdict::pass();
            }
            let all: Vec<usize> = (0..verdicts.len()).collect();
            return Verdict { rewritten: Some(wire::subscribe_with(packet, header, &sub, &all)), ..Default::default() };
        }
        let code = if self.v5 { NOT_AUTHORIZED } else { 0x80 };
        let denied: Vec<Denial> = sub
            .filters
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v == Sub::Deny)
            .map(|((f, _), _)| Denial::Subscribe(f.clone()))
            .collect();
        if verdicts.iter().all(|v| *v == Sub::Deny) {
            let codes = vec![code; verdicts.len()];
            return Verdict { reply: Some(wire::suback(sub.id, self.v5, &codes)), denied, ..Default::default() };
        }
        let kept: Vec<usize> = (0..verdicts.len()).filter(|i| verdicts[*i] != Sub::Deny).collect();
        self.pending_subs.insert(sub.id, verdicts.iter().map(|v| (*v == Sub::Deny).then_some(code)).collect());
        Verdict {
            forward: false,
            rewritten: Some(wire::subscribe_with(packet, header, &sub, &kept)),
            denied,
            ..Default::default()
        }
    }

    /// UNSUBSCRIBE: `$` filters get their internal name.
    fn unsubscribe(&mut self, packet: &[u8], header: usize) -> Verdict {
        let Some(filters) = wire::unsubscribe(packet, header, self.v5) else { return Verdict::pass() };
        if !filters.iter().any(|f| f.starts_with('$')) {
            return Verdict::pass();
        }
        self.dollar_subs.retain(|(x, _)| !filters.contains(x));
        Verdict { rewritten: wire::unsubscribe_renamed(packet, header, self.v5), ..Default::default() }
    }

    /// The client finished delivery `id` with an ack of `kind`: the parked
    /// PUBLISHes that now fit under its Receive Maximum, to send it.
    fn finished(&mut self, id: u16, kind: u8) -> Option<Vec<u8>> {
        match self.inflight_out.get(&id) {
            Some(k) if *k == kind || kind == 5 => {
                self.inflight_out.remove(&id);
            }
            _ => return None,
        }
        let mut out = Vec::new();
        while self.receive_max.is_none_or(|m| self.inflight_out.len() < m as usize)
            && let Some((id, kind, bytes)) = self.parked.pop_front()
        {
            self.inflight_out.insert(id, kind);
            out.extend_from_slice(&bytes);
        }
        (!out.is_empty()).then_some(out)
    }

    /// A whole packet from rumqttd to the client.
    pub fn from_broker(&mut self, packet: &[u8], header: usize) -> Verdict {
        match packet[0] >> 4 {
            3 => {
                let Some(p) = wire::publish(packet, header, self.v5) else { return Verdict::pass() };
                // rumqttd's topic aliases towards the client: resolved here,
                // and a name the client was never told (its first use was
                // filtered out) is written out in full.
                let full = match (p.topic.is_empty(), p.alias) {
                    (false, Some(a)) => {
                        self.out_aliases.insert(a, p.topic.clone());
                        p.topic.clone()
                    }
                    (true, Some(a)) => self.out_aliases.get(&a).cloned().unwrap_or_default(),
                    _ => p.topic.clone(),
                };
                // A `$` topic: only through a `$` filter, under its own name.
                let (topic, dollar) = match full.strip_prefix(DOLLAR) {
                    Some(t) => (t, true),
                    None => (full.as_str(), false),
                };
                // The client's Maximum Packet Size: what is bigger is not sent (MQTT 5 §3.1.2.11.4).
                let fits = self.max_packet.is_none_or(|m| packet.len() <= m as usize);
                let readable = fits
                    && !topic.is_empty()
                    && (!dollar || self.dollar_subs.iter().any(|(_, f)| f.matches(topic)))
                    && self.acl.may_read(topic);
                let told = p.alias.is_none_or(|a| self.told_aliases.get(&a).is_some_and(|t| t == topic));
                let renamed = dollar || (p.topic.is_empty() && !told);
                if readable && let Some(a) = p.alias {
                    self.told_aliases.insert(a, topic.to_string());
                }
                // MQTT 5: delivered at min(published, granted), our tag taken out.
                let found = if self.v5 { wire::qos_tag(packet, header) } else { None };
                let want = found.flatten().map_or(p.qos, |t| t.min(p.qos));
                // Rebuilt without our tag (None: properties rumqttd would not
                // write; then as it is, at rumqttd's QoS).
                let rebuilt = match found.is_some() {
                    true => wire::publish_rebuilt(packet, header, renamed.then_some(topic), want, None),
                    false => None,
                };
                let qos = if rebuilt.is_some() { want } else { p.qos };
                let pass = || match (renamed, rebuilt) {
                    (_, Some(r)) => Verdict { rewritten: Some(r), ..Default::default() },
                    (false, None) => Verdict::pass(),
                    (true, None) => {
                        Verdict { rewritten: Some(wire::publish_renamed(packet, header, topic)), ..Default::default() }
                    }
                };
                let Some(id) = p.id else {
                    return if readable { pass() } else { Verdict { filtered: true, ..Default::default() } };
                };
                if readable {
                    let mut v = pass();
                    if qos == 0 {
                        // Sent as QoS 0: rumqttd's ack is ours to give.
                        if p.qos == 2 {
                            self.dropped_qos2.insert(id);
                        }
                        self.acks.expect(id, Some(wire::ack(if p.qos == 1 { 4 } else { 5 }, id, None)));
                        v.reply = self.acks.ready();
                        return v;
                    }
                    self.acks.expect(id, None);
                    if qos < p.qos {
                        self.downgraded.insert(id);
                    }
                    // The client's Receive Maximum: past it, the PUBLISH waits.
                    let full = self.receive_max.is_some_and(|m| self.inflight_out.len() >= m as usize);
                    if full || !self.parked.is_empty() {
                        let bytes = v.rewritten.take().unwrap_or_else(|| packet.to_vec());
                        self.parked.push_back((id, if qos == 1 { 4 } else { 7 }, bytes));
                        return Verdict::default();
                    }
                    self.inflight_out.insert(id, if qos == 1 { 4 } else { 7 });
                    return v;
                }
                if p.qos == 2 {
                    self.dropped_qos2.insert(id);
                }
                self.acks.expect(id, Some(wire::ack(if p.qos == 1 { 4 } else { 5 }, id, None)));
                Verdict { reply: self.acks.ready(), filtered: true, ..Default::default() }
            }
            6 => match wire::packet_id(packet, header) {
                Some(id) if self.dropped_qos2.remove(&id) => {
                    self.comps.expect(id, Some(wire::ack(7, id, None)));
                    Verdict { reply: self.comps.ready(), ..Default::default() }
                }
                Some(id) => {
                    self.comps.expect(id, None);
                    Verdict::pass()
                }
                None => Verdict::pass(),
            },
            9 => {
                let Some(id) = wire::packet_id(packet, header) else { return Verdict::pass() };
                let Some(layout) = self.pending_subs.remove(&id) else { return Verdict::pass() };
                match wire::suback_merged(packet, header, self.v5, &layout) {
                    Some(p) => Verdict { rewritten: Some(p), ..Default::default() },
                    None => Verdict::pass(),
                }
            }
            _ => Verdict::pass(),
        }
    }
}

/// MQTT packet pieces the [`Gate`] reads and writes (whole packets in,
/// `header` = length of the fixed header).
pub mod wire {
    pub(crate) fn varint(b: &[u8], at: &mut usize) -> Option<usize> {
        let mut n = 0usize;
        for i in 0..4 {
            let x = *b.get(*at)?;
            *at += 1;
            n |= ((x & 0x7f) as usize) << (7 * i);
            if x & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
    }

    fn put_varint(out: &mut Vec<u8>, n: usize) {
        crate::uplink::codec::put_varint(out, n)
    }

    /// A fixed header byte and a body, as one packet.
    pub(crate) fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(first);
        put_varint(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    /// The packet id right after the fixed header (PUBACK … PUBCOMP, SUBACK).
    pub fn packet_id(p: &[u8], header: usize) -> Option<u16> {
        u16_at(p, header)
    }

    /// PUBACK (4), PUBREC (5), PUBREL (6), PUBCOMP (7), with an MQTT 5 reason code.
    pub fn ack(kind: u8, id: u16, reason: Option<u8>) -> Vec<u8> {
        let first = (kind << 4) | if kind == 6 { 2 } else { 0 };
        let [hi, lo] = id.to_be_bytes();
        match reason {
            Some(r) => vec![first, 3, hi, lo, r],
            None => vec![first, 2, hi, lo],
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    pub struct Publish {
        pub topic: String,
        pub qos: u8,
        pub id: Option<u16>,
        /// MQTT 5 Topic Alias.
        pub alias: Option<u16>,
    }

    /// Skip one MQTT 5 property value of property `id` at `at`.
    fn skip_property(b: &[u8], id: u8, at: &mut usize) -> Option<()> {
        match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => *at += 1,
            0x13 | 0x21 | 0x22 | 0x23 => *at += 2,
            0x02 | 0x11 | 0x18 | 0x27 => *at += 4,
            0x0B => {
                varint(b, at)?;
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => *at += 2 + u16_at(b, *at)? as usize,
            0x26 => {
                *at += 2 + u16_at(b, *at)? as usize;
                *at += 2 + u16_at(b, *at)? as usize;
            }
            _ => return None,
        }
        (*at <= b.len()).then_some(())
    }

    /// A PUBLISH's (end of the topic, packet id, where its properties
    /// (MQTT 5) or its payload (3.1.1) start).
    pub(crate) fn publish_head(p: &[u8], header: usize) -> Option<(usize, Option<u16>, usize)> {
        let qos = (p[0] >> 1) & 3;
        let topic_end = header + 2 + u16_at(p, header)? as usize;
        let id = if qos > 0 { Some(u16_at(p, topic_end)?) } else { None };
        Some((topic_end, id, topic_end + if qos > 0 { 2 } else { 0 }))
    }

    pub fn publish(p: &[u8], header: usize, v5: bool) -> Option<Publish> {
        let qos = (p[0] >> 1) & 3;
        let (topic_end, id, mut at) = publish_head(p, header)?;
        let topic = std::str::from_utf8(p.get(header + 2..topic_end)?).ok()?.to_string();
        let mut alias = None;
        if v5 {
            let len = varint(p, &mut at)?;
            let end = at + len;
            while at < end {
                let prop = p[at];
                at += 1;
                if prop == 0x23 {
                    alias = Some(u16_at(p, at)?);
                }
                skip_property(p, prop, &mut at)?;
            }
        }
        Some(Publish { topic, qos, id, alias })
    }

    #[derive(Debug)]
    pub struct Subscribe {
        pub id: u16,
        /// Where the filters start (after the id and the MQTT 5 properties).
        filters_at: usize,
        /// (filter, byte range of its entry: length, filter, options).
        pub filters: Vec<(String, std::ops::Range<usize>)>,
    }

    pub fn subscribe(p: &[u8], header: usize, v5: bool) -> Option<Subscribe> {
        let id = u16_at(p, header)?;
        let mut at = header + 2;
        if v5 {
            let len = varint(p, &mut at)?;
            at += len;
        }
        let filters_at = at;
        let mut filters = Vec::new();
        while at < p.len() {
            let n = u16_at(p, at)? as usize;
            let f = std::str::from_utf8(p.get(at + 2..at + 2 + n)?).ok()?.to_string();
            let end = at + 2 + n + 1;
            if end > p.len() {
                return None;
            }
            filters.push((f, at..end));
            at = end;
        }
        (!filters.is_empty()).then_some(Subscribe { id, filters_at, filters })
    }

    /// The same SUBSCRIBE with only the filters numbered in `keep`, `$`
    /// filters under their internal name.
    pub fn subscribe_with(p: &[u8], header: usize, s: &Subscribe, keep: &[usize]) -> Vec<u8> {
        let mut body = p[header..s.filters_at].to_vec();
        for i in keep {
            let (f, range) = &s.filters[*i];
            let name = super::internal_topic(f);
            body.extend_from_slice(&(name.len() as u16).to_be_bytes());
            body.extend_from_slice(name.as_bytes());
            body.push(p[range.end - 1]);
        }
        packet(p[0], &body)
    }

    /// The filters of an UNSUBSCRIBE.
    pub fn unsubscribe(p: &[u8], header: usize, v5: bool) -> Option<Vec<String>> {
        let mut at = header + 2;
        if v5 {
            let len = varint(p, &mut at)?;
            at += len;
        }
        let mut out = Vec::new();
        while at < p.len() {
            let n = u16_at(p, at)? as usize;
            out.push(std::str::from_utf8(p.get(at + 2..at + 2 + n)?).ok()?.to_string());
            at += 2 + n;
        }
        Some(out)
    }

    /// The same UNSUBSCRIBE, `$` filters under their internal name.
    pub fn unsubscribe_renamed(p: &[u8], header: usize, v5: bool) -> Option<Vec<u8>> {
        let mut at = header + 2;
        if v5 {
            let len = varint(p, &mut at)?;
            at += len;
        }
        let mut body = p.get(header..at)?.to_vec();
        for f in unsubscribe(p, header, v5)? {
            let name = super::internal_topic(&f);
            body.extend_from_slice(&(name.len() as u16).to_be_bytes());
            body.extend_from_slice(name.as_bytes());
        }
        Some(packet(p[0], &body))
    }

    /// Key of the MQTT 5 user property the front door adds to a client's
    /// PUBLISH (QoS 0 and 1 only) to remember the QoS it was published
    /// with: rumqttd 0.20 delivers at the subscription's QoS instead of
    /// min(published, granted) (bytebeamio/rumqtt#707). Stripped from every
    /// PUBLISH towards a client, and from a client's own before tagging.
    pub const QOS_TAG: &str = "\u{7f}q";

    /// Where the pieces of a v5 PUBLISH are: (end of the topic, packet id,
    /// the property bytes, where the payload starts).
    fn publish_layout(p: &[u8], header: usize) -> Option<(usize, Option<u16>, std::ops::Range<usize>, usize)> {
        let (topic_end, id, mut at) = publish_head(p, header)?;
        let len = varint(p, &mut at)?;
        let props = at..at + len;
        (props.end <= p.len()).then_some((topic_end, id, props.clone(), props.end))
    }

    /// The properties without our QoS tag, and the tag if there was one
    /// (with its QoS, None for a value we never write).
    fn split_tag(props: &[u8]) -> Option<(Vec<u8>, Option<Option<u8>>)> {
        let mut kept = Vec::with_capacity(props.len());
        let mut tag = None;
        let mut at = 0;
        while at < props.len() {
            let start = at;
            let id = props[at];
            at += 1;
            skip_property(props, id, &mut at)?;
            if id == 0x26 {
                let k = u16_at(props, start + 1)? as usize;
                if props.get(start + 3..start + 3 + k)? == QOS_TAG.as_bytes() {
                    let v = u16_at(props, start + 3 + k)? as usize;
                    let q = match props.get(start + 5 + k..start + 5 + k + v)? {
                        b"0" => Some(0),
                        b"1" => Some(1),
                        _ => None,
                    };
                    tag = Some(q.or(tag.flatten()));
                    continue;
                }
            }
            kept.extend_from_slice(&props[start..at]);
        }
        Some((kept, tag))
    }

    /// The QoS tag property of a v5 PUBLISH, if it has one (None also when
    /// malformed), with the QoS it says (None: a value we never write, a
    /// client's forgery).
    pub fn qos_tag(p: &[u8], header: usize) -> Option<Option<u8>> {
        let (_, _, props, _) = publish_layout(p, header)?;
        split_tag(&p[props]).and_then(|(_, t)| t)
    }

    /// A v5 PUBLISH rebuilt: under `topic` (None: its own), at `qos`
    /// (lowering only: a QoS 0 one loses its packet id and DUP flag), any
    /// QoS tag taken out and `tag` (its QoS) put in. None when malformed.
    pub fn publish_rebuilt(p: &[u8], header: usize, topic: Option<&str>, qos: u8, tag: Option<u8>) -> Option<Vec<u8>> {
        let (topic_end, id, props, payload_at) = publish_layout(p, header)?;
        let (mut kept, _) = split_tag(&p[props])?;
        if let Some(q) = tag {
            kept.push(0x26);
            kept.extend_from_slice(&(QOS_TAG.len() as u16).to_be_bytes());
            kept.extend_from_slice(QOS_TAG.as_bytes());
            kept.extend_from_slice(&1u16.to_be_bytes());
            kept.push(b'0' + q);
        }
        let mut body = Vec::with_capacity(p.len() + 16);
        match topic {
            Some(t) => {
                body.extend_from_slice(&(t.len() as u16).to_be_bytes());
                body.extend_from_slice(t.as_bytes());
            }
            None => body.extend_from_slice(&p[header..topic_end]),
        }
        let old_qos = (p[0] >> 1) & 3;
        let qos = qos.min(old_qos);
        if qos > 0 {
            body.extend_from_slice(&id?.to_be_bytes());
        }
        put_varint(&mut body, kept.len());
        body.extend_from_slice(&kept);
        body.extend_from_slice(&p[payload_at..]);
        let first = (p[0] & 0xf9) | (qos << 1);
        let first = if qos == 0 { first & 0xf7 } else { first };
        Some(packet(first, &body))
    }

    /// The Session Expiry Interval (0x11) of an MQTT 5 DISCONNECT.
    pub fn disconnect_expiry(p: &[u8], header: usize) -> Option<u32> {
        let mut at = header + 1;
        let len = varint(p, &mut at)?;
        let end = (at + len).min(p.len());
        while at < end {
            let prop = p[at];
            at += 1;
            if prop == 0x11 {
                return Some(u32::from_be_bytes(p.get(at..at + 4)?.try_into().ok()?));
            }
            skip_property(p, prop, &mut at)?;
        }
        None
    }

    /// The same PUBLISH under another topic name.
    pub fn publish_renamed(p: &[u8], header: usize, topic: &str) -> Vec<u8> {
        let old = u16_at(p, header).unwrap_or(0) as usize;
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(p.get(header + 2 + old..).unwrap_or_default());
        packet(p[0], &body)
    }

    /// A SUBACK with these codes (no properties).
    pub fn suback(id: u16, v5: bool, codes: &[u8]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(codes);
        packet(0x90, &body)
    }

    /// rumqttd's SUBACK for the filters we kept, with our codes put back in
    /// place for the ones we took out (`layout`: Some(code) = ours).
    pub fn suback_merged(p: &[u8], header: usize, v5: bool, layout: &[Option<u8>]) -> Option<Vec<u8>> {
        let mut at = header + 2;
        if v5 {
            let len = varint(p, &mut at)?;
            at += len;
        }
        let mut theirs = p.get(at..)?.iter();
        let mut body = p.get(header..at)?.to_vec();
        for slot in layout {
            body.push(match slot {
                Some(code) => *code,
                None => *theirs.next()?,
            });
        }
        Some(packet(0x90, &body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::config::{AclRule, BrokerUser};

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap()
    }

    fn rule(user: Option<&str>, client_id: Option<&str>, topic: &str, access: AclAccess, allow: bool) -> AclRule {
        AclRule {
            user: user.map(Into::into),
            client_id: client_id.map(Into::into),
            topic: topic.into(),
            access,
            permission: if allow { AclPermission::Allow } else { AclPermission::Deny },
        }
    }

    fn acl(rules: Vec<AclRule>) -> Acl {
        Acl::from_config(&BrokerConfig { acl: rules, ..Default::default() })
    }

    #[test]
    fn filters_parse_and_match_like_mqtt() {
        for bad in ["", "a/#/b", "a#", "a/b+", "+a", "a\0b"] {
            assert!(check_filter(bad).is_err(), "{bad:?}");
        }
        assert!(f("a/#").matches("a"), "# matches the parent level");
        assert!(f("a/#").matches("a/b/c"));
        assert!(!f("a/#").matches("ab"));
        assert!(f("a/+").matches("a/"), "+ matches an empty level");
        assert!(!f("a/+").matches("a/b/c"));
        assert!(!f("a/+").matches("a"));
        assert!(f("+/+").matches("/a"));
        assert!(!f("#").matches("$SYS/x"), "wildcards do not match $ topics");
        assert!(!f("+/x").matches("$SYS/x"));
        assert!(f("$SYS/#").matches("$SYS/x"));
        assert!(f("a/b").matches("a/b") && !f("a/b").matches("a/b/"));
    }

    #[test]
    fn subset_and_overlap_of_filters() {
        let yes = [("a/b", "a/+"), ("a/b", "#"), ("a", "a/#"), ("a/+/c", "a/#"), ("a/+", "+/+"), ("a/#", "a/#")];
        for (x, y) in yes {
            assert!(f(x).subset_of(&f(y)), "{x} ⊆ {y}");
            assert!(f(x).overlaps(&f(y)) && f(y).overlaps(&f(x)), "{x} ∩ {y}");
        }
        let no = [("a/+", "a/b"), ("#", "a/#"), ("a/#", "a/+"), ("a/#", "a/+/#"), ("$SYS/x", "#"), ("$SYS/x", "+/x")];
        for (x, y) in no {
            assert!(!f(x).subset_of(&f(y)), "{x} ⊄ {y}");
        }
        assert!(f("#").overlaps(&f("ward-3/#")));
        assert!(f("a/+/c").overlaps(&f("a/b/+")));
        assert!(f("a").overlaps(&f("a/#")));
        assert!(!f("a/+").overlaps(&f("b/#")));
        assert!(!f("a/+").overlaps(&f("a/b/c")));
        assert!(!f("#").overlaps(&f("$SYS/#")));
        assert!(!f("a/b/c").overlaps(&f("a/+")));
    }

    /// The seed's three examples, as docs/lan-mqtt.md writes them.
    fn seed() -> Acl {
        use AclAccess::*;
        acl(vec![
            rule(Some("username1"), None, "onlyRead/#", Readwrite, true),
            rule(Some("username2"), None, "onlyRead/#", Readwrite, true),
            rule(None, None, "onlyRead/#", Readwrite, false),
            rule(None, None, "noWrite/#", Publish, false),
            rule(None, Some("client1"), "specialTopic", Subscribe, true),
            rule(None, None, "specialTopic", Subscribe, false),
            rule(None, None, "#", Readwrite, true),
        ])
    }

    #[test]
    fn the_seed_examples() {
        let a = seed();
        let u1 = a.compile(Some("username1"), "c-u1");
        let u3 = a.compile(Some("username3"), "c-u3");
        let anon = a.compile(None, "client1");
        assert!(u1.may_publish("onlyRead/x") && u1.may_read("onlyRead/x"));
        assert_eq!(u1.subscribe("onlyRead/#"), Sub::Grant);
        assert!(!u3.may_publish("onlyRead/x") && !u3.may_read("onlyRead/x"));
        assert_eq!(u3.subscribe("onlyRead/#"), Sub::Deny);
        assert_eq!(u3.subscribe("onlyRead/+/x"), Sub::Deny);
        // `#` is granted, but onlyRead/… and specialTopic are not delivered.
        assert_eq!(u3.subscribe("#"), Sub::Partial);
        assert!(!u1.may_publish("noWrite/a") && !anon.may_publish("noWrite/a"));
        assert_eq!(u3.subscribe("noWrite/#"), Sub::Grant);
        assert_eq!(anon.subscribe("specialTopic"), Sub::Grant, "client1, anonymous or not");
        assert_eq!(u3.subscribe("specialTopic"), Sub::Deny);
        assert_eq!(u3.subscribe("+"), Sub::Partial);
        assert!(u3.may_publish("specialTopic"), "publishing is not restricted");
        assert!(!u3.may_read("specialTopic") && anon.may_read("specialTopic"));
    }

    #[test]
    fn first_match_wins_and_the_default_is_deny() {
        use AclAccess::*;
        let a = acl(vec![
            rule(None, None, "ward-3/private", Subscribe, false),
            rule(Some("nurse-*"), None, "ward-3/#", Subscribe, true),
        ]);
        let nurse = a.compile(Some("nurse-7"), "tablet");
        assert_eq!(nurse.subscribe("ward-3/#"), Sub::Partial, "an earlier deny carves a hole");
        assert_eq!(nurse.subscribe("ward-3/bed-1"), Sub::Grant);
        assert_eq!(nurse.subscribe("ward-3/private"), Sub::Deny);
        assert_eq!(nurse.subscribe("#"), Sub::Partial);
        assert_eq!(nurse.subscribe("ward-4/#"), Sub::Deny, "nothing allowed: default deny");
        assert!(nurse.may_read("ward-3/bed-1") && !nurse.may_read("ward-3/private") && !nurse.may_read("ward-4/x"));
        assert!(!nurse.may_publish("ward-3/bed-1"), "no publish rule: default deny");
        let porter = a.compile(Some("porter"), "p");
        assert_eq!(porter.subscribe("ward-3/#"), Sub::Deny);
        assert_eq!(porter.subscribe("#"), Sub::Deny);
        // No rules at all: everything goes.
        let open = acl(vec![]).compile(None, "x");
        assert!(open.may_publish("a") && open.may_read("a"));
        assert_eq!(open.subscribe("#"), Sub::Grant);
    }

    #[test]
    fn substitution_and_dangerous_names() {
        use AclAccess::*;
        let a = acl(vec![
            rule(None, None, "devices/%c/#", Readwrite, true),
            rule(None, None, "users/%u/+", Subscribe, true),
        ]);
        let c = a.compile(Some("ann"), "dev-1");
        assert!(c.may_publish("devices/dev-1/hr") && !c.may_publish("devices/dev-2/hr"));
        assert_eq!(c.subscribe("users/ann/inbox"), Sub::Grant);
        assert_eq!(c.subscribe("users/+/inbox"), Sub::Partial);
        assert_eq!(c.subscribe("users/bob/inbox"), Sub::Deny);
        // Anonymous: the %u rule does not apply.
        assert_eq!(a.compile(None, "dev-1").subscribe("users/ann/inbox"), Sub::Deny);
        // `#` as a client id would turn devices/%c/# into devices/#/#: shut out.
        let evil = a.compile(Some("ann"), "#");
        assert!(!evil.may_publish("devices/dev-1/hr") && !evil.may_publish("devices/#/x"));
        assert_eq!(evil.subscribe("devices/dev-1/#"), Sub::Deny);
        assert!(!a.compile(Some("a+b"), "ok").may_read("users/a+b/x"));
    }

    #[test]
    fn who_may_speak_for_which_device() {
        use crate::allow::Devices;
        let user = |name: &str, devices: Option<&[&str]>| BrokerUser {
            name: name.into(),
            password_hash: String::new(),
            publish: None,
            devices: devices.map(|d| Devices::new(d.iter().copied())),
        };
        let cfg = BrokerConfig {
            users: vec![user("ward3", Some(&["w3-*"])), user("plain", None), user("we*rd", None)],
            devices: Some(Devices::new(["{user}-*"])),
            anonymous_devices: Some(Devices::new(["guest-1"])),
            ..Default::default()
        };
        let a = Acl::from_config(&cfg);
        let may = |u: Option<&str>, d: &str| a.compile(u, "c").may_speak_for(d);
        assert!(may(Some("ward3"), "w3-07") && !may(Some("ward3"), "ward3-07"), "its own list, not the default");
        assert!(may(Some("plain"), "plain-1") && !may(Some("plain"), "w3-07"), "the default, {{user}} substituted");
        assert!(may(Some("from-file"), "from-file-9") && !may(Some("from-file"), "plain-1"), "password_file users too");
        assert!(!may(Some("we*rd"), "we-anything-rd-1"), "a * in a login is no wildcard");
        assert!(may(None, "guest-1") && !may(None, "plain-1"), "anonymous");
        let open = Acl::from_config(&BrokerConfig::default());
        assert!(open.compile(Some("x"), "c").may_speak_for("any") && open.compile(None, "c").may_speak_for("any"));
    }

    #[test]
    fn user_prefixes_are_sugar_for_rules() {
        let cfg = BrokerConfig {
            users: vec![BrokerUser {
                name: "site*1".into(),
                password_hash: String::new(),
                publish: Some(vec!["sensors/site1-".into()]),
                devices: None,
            }],
            ..Default::default()
        };
        let a = Acl::from_config(&cfg);
        let s = a.compile(Some("site*1"), "x");
        assert!(s.may_publish("sensors/site1-w1/hr") && !s.may_publish("sensors/site2-w1/hr"));
        assert_eq!(s.subscribe("#"), Sub::Grant, "no [[broker.acl]]: reading stays open");
        assert!(a.compile(Some("site-x-1"), "x").may_publish("sensors/site2"), "user names are exact in sugar");
        assert!(a.compile(None, "x").may_publish("anything"));
        // With [[broker.acl]] rules, the prefixes come first and the default turns to deny.
        let cfg = BrokerConfig { acl: vec![rule(None, None, "sensors/#", AclAccess::Readwrite, true)], ..cfg };
        let a = Acl::from_config(&cfg);
        assert!(!a.compile(Some("site*1"), "x").may_publish("sensors/site2-w1/hr"));
        assert!(a.compile(Some("other"), "x").may_publish("sensors/site2-w1/hr"));
        assert!(!a.compile(Some("other"), "x").may_publish("elsewhere"));
    }

    #[test]
    fn shared_subscriptions_are_checked_on_their_filter() {
        let a = acl(vec![rule(None, None, "ward-3/#", AclAccess::Subscribe, true)]);
        let c = a.compile(None, "x");
        assert_eq!(c.subscribe("$share/g/ward-3/#"), Sub::Grant);
        assert_eq!(c.subscribe("$share/g/ward-4/#"), Sub::Deny);
        assert_eq!(c.subscribe("$share/g"), Sub::Deny);
    }

    #[test]
    fn a_reload_reaches_open_connections() {
        let store = Arc::new(Store::new(acl(vec![rule(None, None, "a/#", AclAccess::Subscribe, true)])));
        let mut c = ClientAcl::new(store.clone(), None, "x".into());
        assert!(c.may_read("a/1") && !c.may_read("b/1"));
        assert!(!store.replace(store.get().as_ref().clone()), "the same rules are no change");
        assert!(store.replace(acl(vec![rule(None, None, "b/#", AclAccess::Subscribe, true)])));
        assert!(!c.may_read("a/1") && c.may_read("b/1"));
    }

    fn publish_packet(topic: &str, qos: u8, id: u16, v5_props: Option<&[u8]>) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        if let Some(props) = v5_props {
            body.push(props.len() as u8);
            body.extend_from_slice(props);
        }
        body.extend_from_slice(b"payload");
        let mut p = vec![0x30 | (qos << 1), body.len() as u8];
        p.extend(body);
        p
    }

    fn subscribe_packet(id: u16, filters: &[&str], v5: bool) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        if v5 {
            body.push(0);
        }
        for f in filters {
            body.extend_from_slice(&(f.len() as u16).to_be_bytes());
            body.extend_from_slice(f.as_bytes());
            body.push(1);
        }
        let mut p = vec![0x82, body.len() as u8];
        p.extend(body);
        p
    }

    fn gate(v5: bool) -> Gate {
        let store = Arc::new(Store::new(seed()));
        Gate::new(ClientAcl::new(store, Some("username3".into()), "c3".into()), v5)
    }

    #[test]
    fn gate_drops_denied_publishes_with_the_right_ack() {
        for v5 in [false, true] {
            let mut g = gate(v5);
            let props: Option<&[u8]> = v5.then_some(&[]);
            let (v, topic) = g.from_client(&publish_packet("ok/1", 1, 9, props), 2);
            assert!((v.forward || v.rewritten.is_some()) && v.denied.is_empty());
            assert_eq!(topic.as_deref(), Some("ok/1"));
            let (v, _) = g.from_client(&publish_packet("noWrite/x", 1, 9, props), 2);
            assert!(!v.forward);
            assert_eq!(v.denied, vec![Denial::Publish("noWrite/x".into())]);
            assert_eq!(v.reply, Some(if v5 { vec![0x40, 3, 0, 9, 0x87] } else { vec![0x40, 2, 0, 9] }));
            let (v, _) = g.from_client(&publish_packet("noWrite/x", 0, 0, props), 2);
            assert!(!v.forward && v.reply.is_none());
            let (v, _) = g.from_client(&publish_packet("noWrite/x", 2, 10, props), 2);
            assert_eq!(v.reply, Some(if v5 { vec![0x50, 3, 0, 10, 0x87] } else { vec![0x50, 2, 0, 10] }));
            // 3.1.1: the client goes on with PUBREL; we answer PUBCOMP and rumqttd never hears of it.
            let (v, _) = g.from_client(&[0x62, 2, 0, 10], 2);
            if v5 {
                assert!(v.forward, "MQTT 5 flows end at PUBREC >= 0x80");
            } else {
                assert_eq!((v.forward, v.reply), (false, Some(vec![0x70, 2, 0, 10])));
            }
            let (v, _) = g.from_client(&[0x62, 2, 0, 11], 2);
            assert!(v.forward, "other PUBRELs go to rumqttd");
        }
    }

    #[test]
    fn gate_resolves_topic_aliases_before_checking() {
        let mut g = gate(true);
        let (v, _) = g.from_client(&publish_packet("noWrite/x", 1, 1, Some(&[0x23, 0, 5])), 2);
        assert!(!v.forward);
        // The alias alone must not get the message through.
        let (v, _) = g.from_client(&publish_packet("", 1, 2, Some(&[0x01, 1, 0x23, 0, 5])), 2);
        assert!(!v.forward && v.rewritten.is_none(), "{v:?}");
        let (v, topic) = g.from_client(&publish_packet("ok/x", 1, 3, Some(&[0x23, 0, 5])), 2);
        assert!(v.rewritten.is_some() && topic.as_deref() == Some("ok/x"));
        let (v, topic) = g.from_client(&publish_packet("", 1, 4, Some(&[0x23, 0, 5])), 2);
        assert!(v.rewritten.is_some() && topic.as_deref() == Some("ok/x"));
        // Aliases past rumqttd's 4096 are not kept here: rumqttd disconnects for them.
        let (v, _) = g.from_client(&publish_packet("noWrite/y", 1, 5, Some(&[0x23, 0x20, 0])), 2);
        assert!(v.forward && g.aliases.len() == 1, "{v:?}");
    }

    #[test]
    fn gate_takes_denied_filters_out_of_a_subscribe_and_puts_them_back_in_the_suback() {
        for v5 in [false, true] {
            let mut g = gate(v5);
            let code = if v5 { 0x87 } else { 0x80 };
            let (v, _) = g.from_client(&subscribe_packet(7, &["a/b", "onlyRead/#", "#", "specialTopic"], v5), 2);
            assert_eq!(
                v.denied,
                vec![Denial::Subscribe("onlyRead/#".into()), Denial::Subscribe("specialTopic".into())]
            );
            assert!(!v.forward);
            assert_eq!(v.rewritten, Some(subscribe_packet(7, &["a/b", "#"], v5)));
            // rumqttd grants QoS 1 to both; our codes go back in their places.
            let theirs = wire::suback(7, v5, &[1, 1]);
            let v = g.from_broker(&theirs, 2);
            assert_eq!(v.rewritten, Some(wire::suback(7, v5, &[1, code, 1, code])));
            // Another SUBACK with the same id is rumqttd's own business.
            assert!(g.from_broker(&theirs, 2).forward);
            // Nothing allowed: answered at the door.
            let (v, _) = g.from_client(&subscribe_packet(8, &["onlyRead/x"], v5), 2);
            assert_eq!((v.forward, v.rewritten.is_none()), (false, true));
            assert_eq!(v.reply, Some(wire::suback(8, v5, &[code])));
            let (v, _) = g.from_client(&subscribe_packet(9, &["a/#", "+/x"], v5), 2);
            assert!(v.forward && v.denied.is_empty());
        }
    }

    #[test]
    fn gate_filters_what_the_client_may_not_read_and_acks_it_in_order() {
        let mut g = gate(false);
        let v = g.from_broker(&publish_packet("specialTopic", 0, 0, None), 2);
        assert!(v.filtered && !v.forward && v.reply.is_none());
        let v = g.from_broker(&publish_packet("onlyRead/a", 1, 3, None), 2);
        assert_eq!((v.filtered, v.reply), (true, Some(vec![0x40, 2, 0, 3])), "nothing ahead: acked at once");
        // A readable QoS 1 message (id 1) is ahead of the filtered ones (2, 4):
        // our acks wait for the client's, as rumqttd wants them in order.
        assert!(g.from_broker(&publish_packet("ward-3/x", 1, 1, None), 2).forward);
        let v = g.from_broker(&publish_packet("onlyRead/a", 1, 2, None), 2);
        assert_eq!((v.filtered, v.reply), (true, None));
        let v = g.from_broker(&publish_packet("onlyRead/a", 2, 4, None), 2);
        assert_eq!(v.reply, None);
        let (v, _) = g.from_client(&[0x40, 2, 0, 1], 2);
        assert!(!v.forward);
        assert_eq!(v.rewritten, Some(vec![0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x50, 2, 0, 4]));
        // rumqttd's PUBREL for the filtered QoS 2 message: PUBCOMP from us.
        let v = g.from_broker(&[0x62, 2, 0, 4], 2);
        assert_eq!((v.forward, v.reply), (false, Some(vec![0x70, 2, 0, 4])));
        // A PUBREL for the client, then one for us: ours waits for the client's PUBCOMP.
        assert!(g.from_broker(&publish_packet("ward-3/y", 2, 5, None), 2).forward);
        assert!(g.from_broker(&publish_packet("onlyRead/z", 2, 6, None), 2).reply.is_none());
        let (v, _) = g.from_client(&[0x50, 2, 0, 5], 2);
        assert_eq!(v.rewritten, Some(vec![0x50, 2, 0, 5, 0x50, 2, 0, 6]));
        assert!(g.from_broker(&[0x62, 2, 0, 5], 2).forward);
        assert_eq!(g.from_broker(&[0x62, 2, 0, 6], 2).reply, None);
        let (v, _) = g.from_client(&[0x70, 2, 0, 5], 2);
        assert_eq!(v.rewritten, Some(vec![0x70, 2, 0, 5, 0x70, 2, 0, 6]));
        // An ack nothing waits for (an old session's) goes through as it is.
        assert!(g.from_client(&[0x40, 2, 0, 9], 2).0.forward);
    }

    /// `p` as rumqttd delivers it on a subscription of QoS `qos` (#707).
    fn at_qos(p: &[u8], qos: u8) -> Vec<u8> {
        let mut p = p.to_vec();
        p[0] = (p[0] & 0xf9) | (qos << 1);
        p
    }

    #[test]
    fn a_v5_message_reaches_subscribers_at_the_qos_it_was_published_with() {
        let mut g = gate(true);
        // QoS 1 from the client: tagged on the way in, with its own properties kept.
        let (v, _) = g.from_client(&publish_packet("ok/1", 1, 9, Some(&[0x01, 1])), 2);
        let tagged = v.rewritten.expect("tagged");
        assert_eq!(wire::qos_tag(&tagged, 2), Some(Some(1)));
        assert!(wire::publish(&tagged, 2, true).is_some());
        // A client's forged tag on a QoS 2 message is taken out, and none added.
        let forged = wire::publish_rebuilt(&publish_packet("ok/1", 2, 9, Some(&[])), 2, None, 2, Some(0)).unwrap();
        assert_eq!(wire::qos_tag(&forged, 2), Some(Some(0)));
        let (v, _) = g.from_client(&forged, 2);
        let clean = v.rewritten.expect("forgery removed");
        assert!(wire::qos_tag(&clean, 2).is_none() && clean == publish_packet("ok/1", 2, 9, Some(&[])), "{clean:?}");
        // rumqttd delivers it at the subscription's QoS 2: the client gets QoS 1, untagged.
        let tagged = wire::publish_rebuilt(&publish_packet("ward-3/x", 1, 7, Some(&[0x01, 1])), 2, None, 1, Some(1));
        let v = g.from_broker(&at_qos(&tagged.unwrap(), 2), 2);
        assert_eq!(v.rewritten, Some(publish_packet("ward-3/x", 1, 7, Some(&[0x01, 1]))));
        assert_eq!(v.reply, None);
        // Its PUBACK becomes the PUBREC rumqttd waits for; rumqttd's PUBREL is answered here.
        let (v, _) = g.from_client(&[0x40, 2, 0, 7], 2);
        assert_eq!((v.forward, v.rewritten), (false, Some(vec![0x50, 2, 0, 7])));
        let v = g.from_broker(&[0x62, 2, 0, 7], 2);
        assert_eq!((v.forward, v.reply), (false, Some(vec![0x70, 2, 0, 7])));
        // Published at QoS 0, delivered at 1: QoS 0 to the client, rumqttd acked by us.
        let tagged = wire::publish_rebuilt(&publish_packet("ward-3/x", 0, 0, Some(&[])), 2, None, 0, Some(0)).unwrap();
        let mut delivered = at_qos(&tagged, 1);
        delivered.splice(2 + 2 + 8..2 + 2 + 8, [0, 8]);
        delivered[1] += 2;
        let v = g.from_broker(&delivered, 2);
        assert_eq!(v.rewritten, Some(publish_packet("ward-3/x", 0, 0, Some(&[]))));
        assert_eq!(v.reply, Some(vec![0x40, 2, 0, 8]));
        // Untagged (published at QoS 2, or by a 3.1.1 client): as rumqttd sends it.
        assert!(g.from_broker(&publish_packet("ward-3/x", 2, 9, Some(&[])), 2).forward);
    }

    #[test]
    fn the_clients_receive_maximum_holds_back_what_does_not_fit() {
        let mut g = gate(true);
        g.receive_max = Some(1);
        assert!(g.from_broker(&publish_packet("ward-3/a", 1, 1, Some(&[])), 2).forward);
        let v = g.from_broker(&publish_packet("ward-3/b", 1, 2, Some(&[])), 2);
        assert!(!v.forward && v.rewritten.is_none(), "{v:?}");
        // QoS 0 is not counted.
        assert!(g.from_broker(&publish_packet("ward-3/c", 0, 0, Some(&[])), 2).forward);
        // The first one acked: the second goes out with the ack's verdict.
        let (v, _) = g.from_client(&[0x40, 2, 0, 1], 2);
        assert_eq!(v.reply, Some(publish_packet("ward-3/b", 1, 2, Some(&[]))));
        assert_eq!(v.rewritten, Some(vec![0x40, 2, 0, 1]));
        // QoS 2: finished by PUBCOMP (or a failed PUBREC), not by PUBREC.
        assert!(!g.from_broker(&publish_packet("ward-3/d", 2, 3, Some(&[])), 2).forward);
        let (v, _) = g.from_client(&[0x40, 2, 0, 2], 2);
        assert_eq!(v.reply, Some(publish_packet("ward-3/d", 2, 3, Some(&[]))));
        assert!(!g.from_broker(&publish_packet("ward-3/e", 1, 4, Some(&[])), 2).forward);
        assert_eq!(g.from_client(&[0x50, 2, 0, 3], 2).0.reply, None);
        assert!(g.from_broker(&[0x62, 2, 0, 3], 2).forward);
        assert_eq!(g.from_client(&[0x70, 2, 0, 3], 2).0.reply, Some(publish_packet("ward-3/e", 1, 4, Some(&[]))));
    }

    #[test]
    fn an_mqtt5_disconnect_may_change_the_session_expiry() {
        let mut g = gate(true);
        assert_eq!(g.from_client(&[0xe0, 0], 2).0, Verdict::pass());
        assert_eq!(g.disconnect_expiry, None);
        g.from_client(&[0xe0, 7, 0, 5, 0x11, 0, 0, 0, 5], 2);
        assert_eq!(g.disconnect_expiry, Some(5));
    }

    #[test]
    fn dollar_topics_reach_only_dollar_filters_under_their_own_name() {
        let store = Arc::new(Store::new(acl(vec![])));
        let mut g = Gate::new(ClientAcl::new(store, None, "c".into()), false);
        let status = format!("{DOLLAR}$SYS/edge-gateway/status");
        // Only `#`: rumqttd would send the status (it matches `#` inside), the gate drops it.
        assert!(g.from_client(&subscribe_packet(1, &["#"], false), 2).0.forward);
        let v = g.from_broker(&publish_packet(&status, 0, 0, None), 2);
        assert!(v.filtered && !v.forward);
        // `$SYS/#` goes to rumqttd under its internal name, and the status comes back as `$SYS/…`.
        let (v, _) = g.from_client(&subscribe_packet(2, &["$SYS/#", "a"], false), 2);
        assert_eq!(v.rewritten, Some(subscribe_packet(2, &[&format!("{DOLLAR}$SYS/#"), "a"], false)));
        let v = g.from_broker(&publish_packet(&status, 1, 7, None), 2);
        assert_eq!(v.rewritten, Some(publish_packet("$SYS/edge-gateway/status", 1, 7, None)));
        // Unsubscribed: dropped again.
        let unsub = [0xA2, 10, 0, 3, 0, 6, b'$', b'S', b'Y', b'S', b'/', b'#'];
        let (v, _) = g.from_client(&unsub, 2);
        let mut renamed = vec![0xA2, 11, 0, 3, 0, 7, 0x7f];
        renamed.extend_from_slice(b"$SYS/#");
        assert_eq!(v.rewritten, Some(renamed));
        assert!(g.from_broker(&publish_packet(&status, 0, 0, None), 2).filtered);
        // Clients publish no `$` topics, nor the internal prefix.
        assert!(!g.from_client(&publish_packet("$SYS/x", 0, 0, None), 2).0.forward);
        assert!(!g.from_client(&publish_packet(&status, 0, 0, None), 2).0.forward);
        let (v, _) = g.from_client(&subscribe_packet(3, &[&format!("{DOLLAR}$SYS/#")], false), 2);
        assert_eq!(v.reply, Some(wire::suback(3, false, &[0x80])));
    }

    #[test]
    fn gate_resolves_rumqttds_aliases_and_keeps_the_clients_maximum_packet_size() {
        let mut g = gate(true);
        // Alias 3 first names a topic the client may not read: filtered.
        let v = g.from_broker(&publish_packet("onlyRead/a", 0, 0, Some(&[0x23, 0, 3])), 2);
        assert!(v.filtered);
        let v = g.from_broker(&publish_packet("", 0, 0, Some(&[0x23, 0, 3])), 2);
        assert!(v.filtered, "the alias alone does not get it through");
        let v = g.from_broker(&publish_packet("open/b", 0, 0, Some(&[0x23, 0, 4])), 2);
        assert!(v.forward);
        assert!(g.from_broker(&publish_packet("", 0, 0, Some(&[0x23, 0, 4])), 2).forward);
        g.max_packet = Some(20);
        let v = g.from_broker(&publish_packet("open/too-big-for-the-client", 0, 0, Some(&[])), 2);
        assert!(v.filtered && !v.forward);
    }

    #[test]
    fn wire_parses_v5_publish_properties() {
        // Payload format, message expiry, content type, user property, subscription id, alias.
        let props =
            [0x01, 1, 0x02, 0, 0, 0, 9, 0x03, 0, 1, b'x', 0x26, 0, 1, b'k', 0, 1, b'v', 0x0B, 0x81, 0x01, 0x23, 0, 3];
        let p = publish_packet("t", 1, 5, Some(&props));
        assert_eq!(
            wire::publish(&p, 2, true),
            Some(wire::Publish { topic: "t".into(), qos: 1, id: Some(5), alias: Some(3) })
        );
        assert_eq!(wire::publish(&p[..6], 2, true), None);
    }
}

//! Topic patterns such as `sensors/{device}/{sensor}`: the MQTT filter to
//! subscribe to, the ids a topic carries, and the topic for given ids.

/// A topic pattern whose `{device}` and `{sensor}` placeholders are whole levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
    Sensor,
}

/// A topic name: non-empty, no wildcards, no NUL, at most 65535 bytes.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= 65_535 && !t.contains(['+', '#', '\0'])
}

impl TopicPattern {
    pub fn parse(s: &str) -> Result<TopicPattern, String> {
        if !valid_topic(s) {
            return Err(format!("{s:?} is not a topic name (empty, or has '+', '#' or NUL)"));
        }
        let mut levels = Vec::new();
        for part in s.split('/') {
            levels.push(match part {
                "{device}" => Level::Device,
                "{sensor}" => Level::Sensor,
                p if p.contains(['{', '}']) => {
                    return Err(format!(
                        "level {p:?} of {s:?}: placeholders are {{device}} and {{sensor}}, each a whole level"
                    ));
                }
                p => Level::Literal(p.to_string()),
            });
        }
        let count = |l: &Level| levels.iter().filter(|x| *x == l).count();
        if count(&Level::Device) != 1 || count(&Level::Sensor) != 1 {
            return Err(format!("{s:?} must contain {{device}} and {{sensor}} once each, as whole levels"));
        }
        Ok(TopicPattern { levels })
    }

    /// The MQTT subscription filter: placeholders become `+`.
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Device | Level::Sensor => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// `(device, sensor)` when `topic` fits the pattern.
    pub fn matches<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let mut parts = topic.split('/');
        let (mut device, mut sensor) = (None, None);
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(s) if s == part => {}
                Level::Literal(_) => return None,
                Level::Device => device = Some(part),
                Level::Sensor => sensor = Some(part),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((device?, sensor?))
    }

    /// The topic for these ids.
    pub fn topic(&self, device: &str, sensor: &str) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Device => device,
                Level::Sensor => sensor,
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Whether some topic fits both patterns.
    pub fn overlaps(&self, other: &TopicPattern) -> bool {
        self.levels.len() == other.levels.len()
            && self.levels.iter().zip(&other.levels).all(|(a, b)| match (a, b) {
                (Level::Literal(x), Level::Literal(y)) => x == y,
                _ => true,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_patterns() {
        let p = TopicPattern::parse("sensors/{device}/{sensor}").unwrap();
        assert_eq!(p.filter(), "sensors/+/+");
        assert_eq!(p.matches("sensors/wrist-07/spo2"), Some(("wrist-07", "spo2")));
        assert_eq!(p.matches("sensors/wrist-07"), None);
        assert_eq!(p.matches("sensors/wrist-07/spo2/x"), None);
        assert_eq!(p.matches("other/wrist-07/spo2"), None);
        let r = TopicPattern::parse("readings/{device}/{sensor}").unwrap();
        assert_eq!(r.topic("a", "b"), "readings/a/b");
        assert!(!p.overlaps(&r));
        assert!(p.overlaps(&TopicPattern::parse("sensors/{sensor}/{device}").unwrap()));
        let odd = TopicPattern::parse("site/{sensor}/x/{device}").unwrap();
        assert_eq!(odd.matches("site/hr/x/d1"), Some(("d1", "hr")));
    }

    #[test]
    fn bad_patterns_are_explained() {
        for bad in ["", "sensors/+/+", "sensors/{device}", "s/{device}-x/{sensor}", "s/{device}/{device}/{sensor}"] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad}");
        }
    }
}

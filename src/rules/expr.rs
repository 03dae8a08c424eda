//! A rule's `when` condition, compiled once by `evalexpr` (v11, MIT).
//!
//! Variables: `value` (a number, or a tuple for an array value: `len(value)`,
//! `value.0` is not evalexpr syntax, so arrays are tested with `len` and
//! `min`/`max`), `device`, `sensor` (strings), `ts` (unix ms) and `seq`
//! (an integer, or empty when the reading has none). Builtins such as
//! `len`, `min`, `max`, `math::abs`, `str::regex_matches` are available.
//! A condition that fails to evaluate for a reading (e.g. `len(value)` of a
//! number) is false for it, and counted as a rule error.

use crate::reading::{Reading, Value};
use evalexpr::{Context, EvalexprError, EvalexprResult, Node, Value as EValue};

const VARIABLES: [&str; 5] = ["value", "device", "sensor", "ts", "seq"];

#[derive(Debug, Clone)]
pub struct Condition {
    tree: Node,
    /// Which variables the expression reads, so only those are built per reading.
    reads: [bool; 5],
}

impl Condition {
    /// Compile `src`; the error says what is wrong in operator's words.
    pub fn compile(src: &str) -> Result<Condition, String> {
        let tree = evalexpr::build_operator_tree(src).map_err(|e| format!("{src:?} is not an expression: {e}"))?;
        let mut reads = [false; 5];
        for v in tree.iter_read_variable_identifiers() {
            match VARIABLES.iter().position(|k| *k == v) {
                Some(i) => reads[i] = true,
                None => {
                    return Err(format!("{src:?} reads {v:?}: a condition can read value, device, sensor, ts and seq"));
                }
            }
        }
        if tree.iter_variable_identifiers().count() != tree.iter_read_variable_identifiers().count() {
            return Err(format!("{src:?} assigns a variable: a condition only reads"));
        }
        let c = Condition { tree, reads };
        // A number and an array reading: a condition that is not a boolean
        // for either is a mistake the operator should hear about now.
        let probe =
            |value: Value| Reading { device: "d".into(), sensor: "s".into(), seq: Some(1), ts: 1, value, boot: None };
        let results = [c.eval(&probe(Value::Number(1.0))), c.eval(&probe(Value::Array(vec![1.0, 2.0, 3.0])))];
        if results.iter().all(|r| r.is_err()) {
            let e = results.into_iter().next().expect("two").unwrap_err();
            return Err(format!("{src:?} does not evaluate to true or false: {e}"));
        }
        Ok(c)
    }

    /// Evaluate for one reading.
    pub fn eval(&self, r: &Reading) -> EvalexprResult<bool> {
        let vars = Vars::of(r, self.reads);
        self.tree.eval_boolean_with_context(&vars)
    }
}

struct Vars {
    values: [EValue; 5],
}

impl Vars {
    fn of(r: &Reading, reads: [bool; 5]) -> Vars {
        let mut values = [EValue::Empty, EValue::Empty, EValue::Empty, EValue::Empty, EValue::Empty];
        if reads[0] {
            values[0] = match &r.value {
                Value::Number(n) => EValue::Float(*n),
                Value::Array(a) => EValue::Tuple(a.iter().map(|x| EValue::Float(*x)).collect()),
            };
        }
        if reads[1] {
            values[1] = EValue::String(r.device.clone());
        }
        if reads[2] {
            values[2] = EValue::String(r.sensor.clone());
        }
        if reads[3] {
            values[3] = EValue::Int(r.ts.min(i64::MAX as u64) as i64);
        }
        if reads[4] {
            values[4] = r.seq.map_or(EValue::Empty, |s| EValue::Int(s.min(i64::MAX as u64) as i64));
        }
        Vars { values }
    }
}

impl Context for Vars {
    fn get_value(&self, identifier: &str) -> Option<&EValue> {
        VARIABLES.iter().position(|k| *k == identifier).map(|i| &self.values[i])
    }

    fn call_function(&self, identifier: &str, _argument: &EValue) -> EvalexprResult<EValue> {
        Err(EvalexprError::FunctionIdentifierNotFound(identifier.to_string()))
    }

    fn are_builtin_functions_disabled(&self) -> bool {
        false
    }

    fn set_builtin_functions_disabled(&mut self, disabled: bool) -> EvalexprResult<()> {
        if disabled { Err(EvalexprError::BuiltinFunctionsCannotBeDisabled) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(v: Value) -> Reading {
        Reading { device: "wrist-07".into(), sensor: "heart_rate".into(), seq: Some(4), ts: 1000, value: v, boot: None }
    }

    #[test]
    fn conditions_read_the_reading() {
        let c = Condition::compile("value > 180").unwrap();
        assert!(c.eval(&r(Value::Number(181.0))).unwrap());
        assert!(!c.eval(&r(Value::Number(180.0))).unwrap());
        let c = Condition::compile("len(value) == 3").unwrap();
        assert!(c.eval(&r(Value::Array(vec![1.0, 2.0, 3.0]))).unwrap());
        assert!(c.eval(&r(Value::Number(1.0))).is_err(), "len of a number is an error, so false");
        let c = Condition::compile("device == \"wrist-07\" && seq >= 4 && ts < 2000").unwrap();
        assert!(c.eval(&r(Value::Number(0.0))).unwrap());
    }

    #[test]
    fn bad_conditions_are_refused_at_load() {
        assert!(Condition::compile("value >").is_err());
        assert!(Condition::compile("(value > 3").unwrap_err().contains("not an expression"));
        assert!(Condition::compile("pressure > 3").unwrap_err().contains("reads \"pressure\""));
        assert!(Condition::compile("value + 1").unwrap_err().contains("true or false"));
        assert!(Condition::compile("value = 3").is_err());
    }
}

//! Whether a namespace still holds one of our tables as we made it: what
//! the reconcile loop asks before deciding to rebuild a table.
//!
//! `nft` does not hand back the JSON it was given: it adds handles and
//! counter values and may rewrite expressions into an equivalent form. So
//! the comparison is on the table's *shape*, read the same way from our
//! batch and from `nft -j list table`: its chains (with their hook, type,
//! priority and policy), and in each chain, in order, every rule's comment,
//! the kinds of its statements, the plain string operands of its matches
//! (interface names, addresses) and the whole of a `dnat` (a VIP's map of
//! backends). That catches a deleted table, chain or rule, a rule added by
//! hand into our table, a flushed chain, a changed interface name, VIP or
//! backend; it does not look into prefixes or sets of several elements,
//! which nft may print in another form than it was given.

use std::collections::BTreeMap;

use serde_json::Value;

/// How a namespace's copy of one of our tables compares with what we would
/// apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    /// The table is as we would make it (or absent, and not wanted).
    InSync,
    /// The table should exist and does not.
    Missing,
    /// The table exists and differs from what we would make (or exists and
    /// should not).
    Differs,
}

/// The comparable part of a table; see the module comment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    chains: BTreeMap<String, ChainShape>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ChainShape {
    /// `type hook prio policy` of a base chain, empty for a regular one.
    base: String,
    rules: Vec<RuleShape>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleShape {
    comment: Option<String>,
    /// One entry per statement: its kind (`match`, `counter`, `dnat`...),
    /// and for a match against a plain string, that string.
    statements: Vec<String>,
}

impl Shape {
    /// Reads the chains and rules of an nftables JSON document: either a
    /// batch of commands (`{"add": {"chain": ...}}`; deletes are skipped)
    /// or a listing (`{"chain": ...}`). Tables and metainfo are skipped.
    pub(crate) fn of(document: &Value) -> Self {
        let mut shape = Shape::default();
        let items = document["nftables"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        for item in items {
            let Some((key, body)) = single(item) else {
                continue;
            };
            let (kind, obj) = match key {
                "add" => match single(body) {
                    Some(inner) => inner,
                    None => continue,
                },
                "chain" | "rule" => (key, body),
                _ => continue,
            };
            match kind {
                "chain" => shape.add_chain(obj),
                "rule" => shape.add_rule(obj),
                _ => {}
            }
        }
        shape
    }

    fn add_chain(&mut self, c: &Value) {
        let name = text(&c["name"]);
        let base = if c.get("hook").is_some() {
            ["type", "hook", "prio", "policy"]
                .map(|k| text(&c[k]))
                .join(" ")
        } else {
            String::new()
        };
        self.chains.entry(name).or_default().base = base;
    }

    fn add_rule(&mut self, r: &Value) {
        let statements = r["expr"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(statement)
            .collect();
        let rule = RuleShape {
            comment: r["comment"].as_str().map(str::to_owned),
            statements,
        };
        self.chains
            .entry(text(&r["chain"]))
            .or_default()
            .rules
            .push(rule);
    }
}

/// The one key and value of a JSON object such as `{"add": {...}}`.
fn single(v: &Value) -> Option<(&str, &Value)> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    obj.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// A string as itself, anything else as its JSON text.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn statement(s: &Value) -> String {
    match single(s) {
        Some(("match", m)) => match operand(&m["right"]) {
            Some(right) => format!("match {} {right}", text(&m["op"])),
            None => format!("match {}", text(&m["op"])),
        },
        // A VIP's backends: nft lists the map as it was given.
        Some(("dnat", d)) => format!("dnat {d}"),
        Some((kind, _)) => kind.to_owned(),
        None => s.to_string(),
    }
}

/// A match's right side when it is one plain string. nft lists an
/// anonymous set of one element as the element itself, so such a set
/// counts as its element.
fn operand(right: &Value) -> Option<&str> {
    match right {
        Value::String(s) => Some(s),
        Value::Object(o) => match o.get("set").and_then(Value::as_array).map(Vec::as_slice) {
            Some([Value::String(s)]) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn batch() -> Value {
        json!({"nftables": [
            {"add": {"table": {"family": "ip", "name": "t"}}},
            {"delete": {"table": {"family": "ip", "name": "t"}}},
            {"add": {"table": {"family": "ip", "name": "t"}}},
            {"add": {"chain": {"family": "ip", "table": "t", "name": "post",
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}},
            {"add": {"rule": {"family": "ip", "table": "t", "chain": "post", "comment": "why",
                "expr": [
                    {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "br0"}},
                    {"counter": null},
                    {"masquerade": null}
                ]}}}
        ]})
    }

    /// What `nft -j list table` prints for the same table.
    fn listing(oifname: &str) -> Value {
        json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "t", "handle": 7}},
            {"chain": {"family": "ip", "table": "t", "name": "post", "handle": 1,
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "t", "chain": "post", "handle": 2, "comment": "why",
                "expr": [
                    {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": oifname}},
                    {"counter": {"packets": 3, "bytes": 180}},
                    {"masquerade": null}
                ]}}
        ]})
    }

    #[test]
    fn a_listing_of_what_we_applied_has_our_shape() {
        assert_eq!(Shape::of(&batch()), Shape::of(&listing("br0")));
    }

    #[test]
    fn a_changed_operand_or_a_missing_rule_differs() {
        assert_ne!(Shape::of(&batch()), Shape::of(&listing("br1")));
        let mut flushed = listing("br0");
        if let Some(items) = flushed["nftables"].as_array_mut() {
            items.pop();
        }
        assert_ne!(Shape::of(&batch()), Shape::of(&flushed));
    }

    #[test]
    fn a_set_of_one_reads_as_its_element() {
        assert_eq!(operand(&json!({"set": ["10.0.1.3"]})), Some("10.0.1.3"));
        assert_eq!(operand(&json!("10.0.1.3")), Some("10.0.1.3"));
        assert_eq!(operand(&json!({"set": ["a", "b"]})), None);
    }

    #[test]
    fn an_empty_document_has_no_chains() {
        assert_eq!(Shape::of(&json!({})), Shape::default());
    }
}

//! Documents: canonical JSON, checksums, figment layers and key attribution.

use std::collections::BTreeMap;

use figment::value::{Dict, Tag, Value};
use figment::{Metadata, Profile, Provider};
use sha2::{Digest, Sha256};

use crate::error::{ConfigError, Origin};

/// Canonical JSON: object keys sorted, no whitespace, numbers as
/// `serde_json` prints them. Two equal documents always produce the same
/// bytes, whatever order their keys arrived in.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    match value {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => out.push_str(&serde_json::to_string(s).expect("strings serialize")),
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        J::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key).expect("strings serialize"));
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
    }
}

/// SHA-256 over [`canonical_json`], lowercase hex. This is the checksum a
/// [`ConfigUpdate`](crate::ConfigUpdate) carries and [`Live`](crate::Live)
/// reports.
pub fn checksum(value: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(canonical_json(value).as_bytes()))
}

/// One source's contribution.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) origin: Origin,
    pub(crate) dict: Dict,
    /// For the environment layer: key path -> variable name.
    pub(crate) env_vars: BTreeMap<String, String>,
}

impl Layer {
    pub(crate) fn new(origin: Origin, dict: Dict) -> Self {
        Self {
            origin,
            dict,
            env_vars: BTreeMap::new(),
        }
    }

    /// Does this layer supply the value at `path` (or something under it, or
    /// a non-table where a table was expected on the way)?
    fn touches(&self, path: &[String]) -> bool {
        let mut dict = &self.dict;
        for seg in path {
            match dict.get(seg) {
                None => return false,
                Some(Value::Dict(_, inner)) => dict = inner,
                Some(_) => return true,
            }
        }
        true
    }

    /// Whether this layer sets the value at `path` itself.
    pub(crate) fn sets(&self, path: &[String]) -> bool {
        let Some((last, parents)) = path.split_last() else {
            return false;
        };
        let mut dict = &self.dict;
        for seg in parents {
            match dict.get(seg) {
                Some(Value::Dict(_, inner)) => dict = inner,
                _ => return false,
            }
        }
        dict.contains_key(last)
    }

    /// Removes the value at `path`, if this layer sets it; for the
    /// environment layer, also the record of its variable, returned too.
    pub(crate) fn take(&mut self, path: &[String]) -> Option<(Value, Option<String>)> {
        let (last, parents) = path.split_last()?;
        let mut dict = &mut self.dict;
        for seg in parents {
            match dict.get_mut(seg) {
                Some(Value::Dict(_, inner)) => dict = inner,
                _ => return None,
            }
        }
        let value = dict.remove(last)?;
        Some((value, self.env_vars.remove(&path.join("."))))
    }

    /// Sets `value` at `path`, creating the tables on the way (a non-table
    /// on the way is replaced); `var` is the environment variable that set
    /// it, if any.
    pub(crate) fn put(&mut self, path: &[String], value: Value, var: Option<String>) {
        let Some((last, parents)) = path.split_last() else {
            return;
        };
        let mut dict = &mut self.dict;
        for seg in parents {
            let entry = dict
                .entry(seg.clone())
                .or_insert_with(|| Value::Dict(Tag::Default, Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::Dict(Tag::Default, Dict::new());
            }
            let Value::Dict(_, inner) = entry else {
                return;
            };
            dict = inner;
        }
        dict.insert(last.clone(), value);
        if let Some(var) = var {
            self.env_vars.insert(path.join("."), var);
        }
    }

    /// The precise origin for `path`: for the environment, the variable.
    fn origin_for(&self, path: &[String]) -> Origin {
        if !self.env_vars.is_empty() {
            let key = path.join(".");
            let var = self.env_vars.get(&key).cloned().or_else(|| {
                // A variable under the path, or the one that set an ancestor.
                self.env_vars
                    .iter()
                    .find(|(k, _)| {
                        k.starts_with(&format!("{key}.")) || key.starts_with(&format!("{k}."))
                    })
                    .map(|(_, v)| v.clone())
            });
            if let Some(var) = var {
                return Origin::Env { var };
            }
        }
        self.origin.clone()
    }
}

/// The layers of one load, lowest precedence first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layers(pub(crate) Vec<Layer>);

impl Layers {
    /// Which layer the effective value at `path` came from.
    pub(crate) fn origin_of(&self, path: &[String]) -> Origin {
        self.0
            .iter()
            .rev()
            .find(|l| l.touches(path))
            .map(|l| l.origin_for(path))
            .unwrap_or(Origin::Default)
    }

    /// All layers merged with figment (tables merge key by key, a higher
    /// layer's scalar or array replaces a lower one's).
    pub(crate) fn merged(&self) -> Result<Dict, ConfigError> {
        let mut figment = figment::Figment::new();
        for layer in &self.0 {
            figment = figment.merge(LayerProvider(layer));
        }
        let mut data = figment.data().map_err(|e| ConfigError::Parse {
            origin: Origin::Default,
            key: None,
            message: e.to_string(),
        })?;
        Ok(data.remove(&Profile::Default).unwrap_or_default())
    }
}

struct LayerProvider<'a>(&'a Layer);

impl Provider for LayerProvider<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.0.origin.to_string())
    }

    fn data(&self) -> Result<figment::value::Map<Profile, Dict>, figment::Error> {
        Ok(figment::value::Map::from([(
            Profile::Default,
            self.0.dict.clone(),
        )]))
    }
}

/// Converts a JSON object into a figment table; `origin` names the source
/// in the error when it is not an object.
pub(crate) fn json_to_dict(json: &serde_json::Value, origin: &Origin) -> Result<Dict, ConfigError> {
    if !json.is_object() {
        return Err(ConfigError::Parse {
            origin: origin.clone(),
            key: None,
            message: "the document must be a JSON object (a table of settings)".into(),
        });
    }
    match Value::serialize(json) {
        Ok(Value::Dict(_, dict)) => Ok(dict),
        Ok(_) => unreachable_object(origin),
        Err(e) => Err(ConfigError::Parse {
            origin: origin.clone(),
            key: None,
            message: e.to_string(),
        }),
    }
}

fn unreachable_object(origin: &Origin) -> Result<Dict, ConfigError> {
    Err(ConfigError::Parse {
        origin: origin.clone(),
        key: None,
        message: "the document did not convert to a table".into(),
    })
}

/// A figment table as JSON.
pub(crate) fn dict_to_json(dict: &Dict) -> serde_json::Value {
    serde_json::to_value(dict).unwrap_or(serde_json::Value::Null)
}

/// Deep-merges `top` over `base` (objects key by key, anything else replaced).
pub(crate) fn merge_json(base: &mut serde_json::Value, top: &serde_json::Value) {
    match (base, top) {
        (serde_json::Value::Object(b), serde_json::Value::Object(t)) => {
            for (k, v) in t {
                match b.get_mut(k) {
                    Some(existing) => merge_json(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, t) => *b = t.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"d":2,"c":"x"}],"x":null}}"#).unwrap();
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":null,"y":[1,{"c":"x","d":2}]},"b":1}"#
        );
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"c":"x","d":2}]},"b":1}"#).unwrap();
        assert_eq!(checksum(&a), checksum(&b));
        assert_ne!(checksum(&a), checksum(&json!({"b": 2})));
        assert_eq!(checksum(&a).len(), 64);
    }
}

//! One value where a list is expected: `protocol = "quic"` means
//! `protocol = ["quic"]`, as sing-box and mihomo read every list field.
//!
//! It lives at the top of the crate, not under `config/`, because the
//! outbound settings (which `config` imports, never the reverse) have list
//! keys too.
//!
//! The single value is handed to the element type's own `Deserialize`, so
//! a wrong one fails with that type's message ("unknown variant `quik`"),
//! and the deserializer (toml) adds the key, line and column as it does for
//! any other value. An untagged enum would instead say only "did not match
//! any variant".
//!
//! Use it on a field:
//!
//! ```
//! # use serde::Deserialize;
//! #[derive(Deserialize)]
//! struct Rule {
//!     #[serde(default, deserialize_with = "tproxyd::one_or_many::vec")]
//!     domain: Vec<String>,
//!     #[serde(default, deserialize_with = "tproxyd::one_or_many::option")]
//!     ports: Option<Vec<u16>>,
//! }
//! let r: Rule = toml::from_str("domain = \"a.com\"\nports = [53, 443]").unwrap();
//! assert_eq!(r.domain, ["a.com"]);
//! assert_eq!(r.ports, Some(vec![53, 443]));
//! ```
//!
//! or, where the elements need more than `Deserialize` (text parsed with
//! `FromStr`, say), deserialize a [`OneOrMany`] of the raw form and convert.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{
    BoolDeserializer, F64Deserializer, I64Deserializer, MapAccessDeserializer, StrDeserializer,
    StringDeserializer, U64Deserializer,
};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A list written either as a list or as its one element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<T> From<OneOrMany<T>> for Vec<T> {
    fn from(v: OneOrMany<T>) -> Vec<T> {
        v.0
    }
}

/// A `Vec<T>` field.
pub fn vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    OneOrMany::deserialize(d).map(|v| v.0)
}

/// An `Option<Vec<T>>` field (with `#[serde(default)]`: absent is `None`).
pub fn option<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    vec(d).map(Some)
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Self-describing formats only (TOML, JSON): which shape was
        // written is what decides.
        d.deserialize_any(OneOrManyVisitor(PhantomData))
    }
}

struct OneOrManyVisitor<T>(PhantomData<T>);

impl<T> OneOrManyVisitor<T> {
    fn one<'de, D: Deserializer<'de>>(d: D) -> Result<OneOrMany<T>, D::Error>
    where
        T: Deserialize<'de>,
    {
        T::deserialize(d).map(|v| OneOrMany(vec![v]))
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrManyVisitor<T> {
    type Value = OneOrMany<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("one value or a list of values")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(OneOrMany(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Self::one(MapAccessDeserializer::new(map))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Self::one(StrDeserializer::<E>::new(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Self::one(StringDeserializer::<E>::new(v))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Self::one(BoolDeserializer::<E>::new(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Self::one(I64Deserializer::<E>::new(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Self::one(U64Deserializer::<E>::new(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Self::one(F64Deserializer::<E>::new(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Proto {
        Tls,
        Quic,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Item {
        name: String,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default, deserialize_with = "vec")]
        protocol: Vec<Proto>,
        #[serde(default, deserialize_with = "vec")]
        port: Vec<u16>,
        #[serde(default, deserialize_with = "option")]
        names: Option<Vec<String>>,
        #[serde(default, deserialize_with = "vec")]
        items: Vec<Item>,
    }

    fn parse(text: &str) -> Result<File, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn one_value_is_a_list_of_one() {
        let f = parse("protocol = \"quic\"\nport = 53\nnames = \"a\"\nitems = { name = \"x\" }")
            .unwrap();
        assert_eq!(f.protocol, [Proto::Quic]);
        assert_eq!(f.port, [53]);
        assert_eq!(f.names, Some(vec!["a".to_string()]));
        assert_eq!(f.items, [Item { name: "x".into() }]);
    }

    #[test]
    fn a_list_is_read_as_before() {
        let f = parse(
            "protocol = [\"tls\", \"quic\"]\nport = [53, 443]\nnames = []\n\
             [[items]]\nname = \"x\"\n[[items]]\nname = \"y\"\n",
        )
        .unwrap();
        assert_eq!(f.protocol, [Proto::Tls, Proto::Quic]);
        assert_eq!(f.port, [53, 443]);
        assert_eq!(f.names, Some(vec![]));
        assert_eq!(f.items.len(), 2);
        let f = parse("").unwrap();
        assert!(f.protocol.is_empty() && f.names.is_none());
    }

    /// A wrong single value fails with the element type's own message,
    /// at its key and line.
    #[test]
    fn a_wrong_single_value_keeps_the_elements_message_and_position() {
        let e = parse("\nprotocol = \"quik\"").unwrap_err();
        assert!(
            e.contains("line 2") && e.contains("unknown variant `quik`"),
            "{e}"
        );
        let e = parse("port = 70000").unwrap_err();
        assert!(e.contains("line 1") && e.contains("70000"), "{e}");
        let e = parse("items = { name = \"x\", bogus = 1 }").unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = parse("names = 5").unwrap_err();
        assert!(
            e.contains("names") && e.contains("expected a string"),
            "{e}"
        );
    }

    /// The outbound entries are an internally tagged enum, which serde
    /// reads through a buffer of its own: one value or a list works there
    /// too (`outbounds = "a"` in a group).
    #[test]
    fn works_inside_an_internally_tagged_enum() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
        enum Entry {
            Group {
                #[serde(deserialize_with = "vec")]
                members: Vec<String>,
            },
        }
        #[derive(Debug, Deserialize)]
        struct Top {
            entry: Entry,
        }
        let one: Top = toml::from_str("[entry]\ntype = \"group\"\nmembers = \"a\"").unwrap();
        let many: Top =
            toml::from_str("[entry]\ntype = \"group\"\nmembers = [\"a\", \"b\"]").unwrap();
        assert_eq!(
            one.entry,
            Entry::Group {
                members: vec!["a".into()]
            }
        );
        assert_eq!(
            many.entry,
            Entry::Group {
                members: vec!["a".into(), "b".into()]
            }
        );
        let e = toml::from_str::<Top>("[entry]\ntype = \"group\"\nmembers = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a string"), "{e}");
    }
}

//! One flat TOML table read into two structs: the table's own keys (`T`,
//! derived with `deny_unknown_fields`) and a group of keys it shares with
//! another table (`S`). That is how each proxy key is declared once:
//! `[proxy]` and `[[service]]` both hold the group beside their own keys.
//!
//! serde's `flatten` cannot do this: it buffers the values, which loses
//! the positions `toml::Spanned` keeps, and an unknown key then no longer
//! gets the list of valid keys. Here the values go straight from the TOML
//! deserializer into their field, and a key that is neither `T`'s nor `S`'s
//! is rejected at its own position with both lists.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};

/// A group of keys that stands in several tables. Declare one with
/// [`shared_keys!`], which writes the struct, `KEYS` and `read` from one
/// list.
pub trait SharedKeys<'de>: Default {
    /// Every key of the group, in declaration order.
    const KEYS: &'static [&'static str];

    /// Reads the value of `key` (one of [`KEYS`](Self::KEYS)) from `map`.
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error>;
}

/// Declares a [`SharedKeys`] struct: every key optional (`Option<TYPE>`),
/// each named once.
macro_rules! shared_keys {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])* $key:ident: $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $key: Option<$ty>, )*
        }

        impl<'de> $crate::config::flat::SharedKeys<'de> for $name {
            const KEYS: &'static [&'static str] = &[$(stringify!($key)),*];

            fn read<A: serde::de::MapAccess<'de>>(
                &mut self,
                key: &str,
                map: &mut A,
            ) -> Result<(), A::Error> {
                match key {
                    $( stringify!($key) => self.$key = Some(map.next_value()?), )*
                    _ => return Err(serde::de::Error::unknown_field(key, Self::KEYS)),
                }
                Ok(())
            }
        }
    };
}
pub(super) use shared_keys;

/// A table holding `T`'s keys and the shared group `S` side by side.
#[derive(Debug, Default)]
pub struct Flat<T, S> {
    pub own: T,
    pub shared: S,
}

impl<'de, T, S> Deserialize<'de> for Flat<T, S>
where
    T: Deserialize<'de>,
    S: SharedKeys<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FlatVisitor(PhantomData))
    }
}

struct FlatVisitor<T, S>(PhantomData<(T, S)>);

impl<'de, T, S> Visitor<'de> for FlatVisitor<T, S>
where
    T: Deserialize<'de>,
    S: SharedKeys<'de>,
{
    type Value = Flat<T, S>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut shared = S::default();
        let own_keys = OwnKeys {
            map,
            shared: &mut shared,
        };
        let own = T::deserialize(de::value::MapAccessDeserializer::new(own_keys))?;
        Ok(Flat { own, shared })
    }
}

/// The table as `T` sees it: the shared keys are taken out on the way.
struct OwnKeys<'s, A, S> {
    map: A,
    shared: &'s mut S,
}

impl<'de, A, S> MapAccess<'de> for OwnKeys<'_, A, S>
where
    A: MapAccess<'de>,
    S: SharedKeys<'de>,
{
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        mut seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            // The key is sorted inside the TOML deserializer's own key step,
            // so that an unknown key's error carries the key's position.
            match self.map.next_key_seed(SortKey::<K, S>(seed, PhantomData))? {
                None => return Ok(None),
                Some(Sorted::Own(value)) => return Ok(Some(value)),
                Some(Sorted::Shared(key, unused)) => {
                    self.shared.read(&key, &mut self.map)?;
                    seed = unused;
                }
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

enum Sorted<V, K> {
    /// One of `T`'s keys, as `T`'s field visitor read it.
    Own(V),
    /// One of the shared keys; the seed is handed back for the next key.
    Shared(String, K),
}

/// Reads a key and sorts it: shared, `T`'s own, or unknown.
struct SortKey<K, S>(K, PhantomData<S>);

impl<'de, K, S> DeserializeSeed<'de> for SortKey<K, S>
where
    K: DeserializeSeed<'de>,
    S: SharedKeys<'de>,
{
    type Value = Sorted<K::Value, K>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let key = String::deserialize(deserializer)?;
        if S::KEYS.contains(&key.as_str()) {
            return Ok(Sorted::Shared(key, self.0));
        }
        let own = IntoDeserializer::<NotOwnKey>::into_deserializer(key.as_str());
        match self.0.deserialize(own) {
            Ok(value) => Ok(Sorted::Own(value)),
            Err(NotOwnKey(own_keys)) => {
                let valid: Vec<String> = own_keys
                    .iter()
                    .chain(S::KEYS)
                    .map(|k| format!("`{k}`"))
                    .collect();
                // serde's wording for an unknown field, which the reporter explains.
                Err(de::Error::custom(format!(
                    "unknown field `{key}`, expected one of {}",
                    valid.join(", ")
                )))
            }
        }
    }
}

/// The error of reading a key that is not one of `T`'s fields: it keeps
/// the list of `T`'s keys that serde's derive reports with it.
#[derive(Debug)]
struct NotOwnKey(&'static [&'static str]);

impl de::Error for NotOwnKey {
    fn custom<M: fmt::Display>(_: M) -> Self {
        NotOwnKey(&[])
    }

    fn unknown_field(_: &str, expected: &'static [&'static str]) -> Self {
        NotOwnKey(expected)
    }
}

impl fmt::Display for NotOwnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not one of the table's own keys")
    }
}

impl std::error::Error for NotOwnKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use toml::Spanned;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Own {
        name: Option<String>,
        size: Option<Spanned<i64>>,
    }

    shared_keys! {
        /// Two keys shared with another table.
        pub struct Shared {
            colour: Spanned<String>,
            round: bool,
        }
    }

    fn parse(text: &str) -> Result<Flat<Own, Shared>, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn own_and_shared_keys_in_any_order_keep_their_positions() {
        let text = "colour = \"red\"\nname = \"a\"\nround = true\nsize = 3\n";
        let t = parse(text).unwrap();
        assert_eq!(t.own.name.as_deref(), Some("a"));
        assert_eq!(t.shared.round, Some(true));
        let colour = t.shared.colour.unwrap();
        assert_eq!(colour.get_ref(), "red");
        assert_eq!(&text[colour.span()], "\"red\"");
        let size = t.own.size.unwrap();
        assert_eq!(&text[size.span()], "3");
    }

    #[test]
    fn unknown_key_is_rejected_at_its_position_with_every_valid_key() {
        let text = "name = \"a\"\ncolor = \"red\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.span(), Some(11..16), "{e}");
        assert_eq!(
            e.message(),
            "unknown field `color`, expected one of `name`, `size`, `colour`, `round`"
        );
    }

    #[test]
    fn a_wrong_type_is_reported_at_the_value_in_either_group() {
        let e = parse("round = 3\n").unwrap_err();
        assert_eq!(e.span(), Some(8..9), "{e}");
        let e = parse("size = \"big\"\n").unwrap_err();
        assert_eq!(e.span(), Some(7..12), "{e}");
    }

    #[test]
    fn an_absent_table_is_all_defaults() {
        let t = parse("").unwrap();
        assert!(t.own.name.is_none() && t.shared.colour.is_none());
    }
}

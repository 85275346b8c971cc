//! The JWS compact serialization, verified with keys parsed once.
//!
//! jsonwebtoken parses PEM and JWK keys; this module does the per-request
//! work: split the token, read the header, check the signature with a
//! pre-parsed key (an HMAC key whose pads are already computed, an RSA,
//! P-256 or Ed25519 public key already decoded), and read the claims in one
//! pass that keeps only the claims a [`Principal`](crate::Principal) and the
//! checks need.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use aws_lc_rs::hmac;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, DecodingKeyKind};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::AuthError;
use crate::config::JwtAlgorithm;

/// A verification key, parsed once.
pub(crate) enum KeyMaterial {
    /// HS256: the HMAC key with its inner and outer pads computed.
    Hmac(Box<hmac::Key>),
    /// RS256, ES256 or EdDSA.
    Public(ParsedPublicKey),
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hmac(_) => f.write_str("KeyMaterial::Hmac([redacted])"),
            Self::Public(_) => f.write_str("KeyMaterial::Public"),
        }
    }
}

impl KeyMaterial {
    /// An HS256 key from its shared secret.
    pub(crate) fn hmac(secret: &[u8]) -> Self {
        Self::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// An asymmetric key for `alg` from a key jsonwebtoken parsed (PEM or JWK).
    pub(crate) fn public(alg: JwtAlgorithm, key: &DecodingKey) -> Result<Self, String> {
        let algorithm: &'static dyn aws_lc_rs::signature::VerificationAlgorithm = match alg {
            JwtAlgorithm::RS256 => &RSA_PKCS1_2048_8192_SHA256,
            JwtAlgorithm::ES256 => &ECDSA_P256_SHA256_FIXED,
            JwtAlgorithm::EdDSA => &ED25519,
            JwtAlgorithm::HS256 => return Err("HS256 keys are secrets, not public keys".into()),
        };
        let parsed = match key.kind() {
            DecodingKeyKind::SecretOrDer(der) => ParsedPublicKey::new(algorithm, der),
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                ParsedPublicKey::new(algorithm, rsa_public_key_der(n, e))
            }
        };
        parsed
            .map(Self::Public)
            .map_err(|e| format!("unusable {} public key: {e}", alg.as_str()))
    }

    /// Whether `signature` is this key's signature of `message`. The HMAC
    /// comparison is constant-time.
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::Hmac(key) => hmac::verify(key, message, signature).is_ok(),
            Self::Public(key) => key.verify_sig(message, signature).is_ok(),
        }
    }
}

/// DER of an RFC 8017 `RSAPublicKey` (`SEQUENCE { n INTEGER, e INTEGER }`)
/// from the big-endian modulus and exponent of a JWK.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, bytes: &[u8]) {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        let bytes = &bytes[start..];
        // A positive INTEGER whose top bit is set needs a leading zero.
        let pad = bytes.first().is_none_or(|&b| b & 0x80 != 0);
        out.push(0x02);
        length(out, bytes.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(bytes);
    }
    fn length(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let be = len.to_be_bytes();
            let skip = be.iter().position(|&b| b != 0).unwrap_or(be.len() - 1);
            out.push(0x80 | (be.len() - skip) as u8);
            out.extend_from_slice(&be[skip..]);
        }
    }
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    integer(&mut body, n);
    integer(&mut body, e);
    let mut out = Vec::with_capacity(body.len() + 8);
    out.push(0x30);
    length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// A token split into its three segments, decoded. `message` is what was
/// signed; `payload` is the claims' JSON text.
pub(crate) struct Parts<'t> {
    pub(crate) message: &'t str,
    pub(crate) header: Header,
    pub(crate) signature: Vec<u8>,
    pub(crate) payload: Vec<u8>,
}

/// The header fields read: `alg` and `kid`.
pub(crate) struct Header {
    pub(crate) alg: JwtAlgorithm,
    pub(crate) kid: Option<String>,
}

/// Splits `token`, reads its header, then decodes its signature and payload.
///
/// A header must be base64url (no padding) JSON with a string `alg` naming
/// a supported algorithm; `kid`, if present, must be a string. A header
/// with `crit` is refused: it names extensions the verifier must understand
/// (RFC 7515 §4.1.11), and this verifier understands none, `b64` included.
pub(crate) fn split(token: &str) -> Result<Parts<'_>, AuthError> {
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(AuthError::Malformed("expected three dot-separated parts"));
    };
    #[derive(Deserialize)]
    struct RawHeader<'a> {
        #[serde(borrow)]
        alg: Option<Cow<'a, str>>,
        #[serde(borrow)]
        kid: Option<Cow<'a, str>>,
        crit: Option<IgnoredAny>,
    }
    let raw = segment(h, "header is not base64url")?;
    let header: RawHeader<'_> =
        serde_json::from_slice(&raw).map_err(|_| AuthError::Malformed("header is not JSON"))?;
    if header.crit.is_some() {
        return Err(AuthError::Malformed(
            "critical header extensions are not supported",
        ));
    }
    let alg_name = header
        .alg
        .ok_or(AuthError::Malformed("header has no alg"))?;
    let alg = JwtAlgorithm::parse(&alg_name)
        .ok_or_else(|| AuthError::UnsupportedAlgorithm(alg_name.into_owned()))?;
    Ok(Parts {
        message: &token[..h.len() + 1 + p.len()],
        header: Header {
            alg,
            kid: header.kid.map(Cow::into_owned),
        },
        signature: segment(s, "signature is not base64url")?,
        payload: segment(p, "payload is not base64url")?,
    })
}

/// Decodes one base64url segment (no padding); `malformed` says which.
fn segment(seg: &str, malformed: &'static str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|_| AuthError::Malformed(malformed))
}

/// One claim's value, as far as the checks care.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Claim<'a> {
    /// A string.
    Str(Cow<'a, str>),
    /// A non-negative integer.
    UInt(u64),
    /// Any other number.
    Float(f64),
    /// A negative integer.
    Int(i64),
    /// An array whose every element is a string.
    StrList(Vec<Cow<'a, str>>),
    /// `null`.
    Null,
    /// Anything else (a boolean, an object, a mixed array).
    Other,
}

impl Claim<'_> {
    /// A NumericDate (RFC 7519 §2) as whole seconds, the way jsonwebtoken
    /// reads it: a non-negative integer, or a finite non-negative number
    /// rounded.
    fn numeric_date(&self) -> Option<u64> {
        match *self {
            Self::UInt(n) => Some(n),
            Self::Float(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                Some(f.round() as u64)
            }
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Claim<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Claim<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Claim::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Claim::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Claim::Str(Cow::Owned(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Claim::UInt(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(v).map_or(Claim::Int(v), Claim::UInt))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Claim::Float(v))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Claim::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Claim::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                let mut all_strings = true;
                while let Some(item) = seq.next_element::<Claim<'de>>()? {
                    match item {
                        Claim::Str(s) if all_strings => out.push(s),
                        _ => all_strings = false,
                    }
                }
                Ok(if all_strings {
                    Claim::StrList(out)
                } else {
                    Claim::Other
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Claim::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// The claims read from a payload; every other claim is skipped unread.
#[derive(Debug, Default)]
pub(crate) struct Claims<'a> {
    pub(crate) exp: Option<Claim<'a>>,
    pub(crate) nbf: Option<Claim<'a>>,
    pub(crate) iss: Option<Claim<'a>>,
    pub(crate) aud: Option<Claim<'a>>,
    pub(crate) sub: Option<Claim<'a>>,
    pub(crate) tenant: Option<Claim<'a>>,
    pub(crate) roles: Option<Claim<'a>>,
    pub(crate) scope: Option<Claim<'a>>,
    pub(crate) scp: Option<Claim<'a>>,
}

/// Names of the configurable claims (`None`: not read).
#[derive(Clone, Copy)]
pub(crate) struct ClaimNames<'n> {
    pub(crate) tenant: Option<&'n str>,
    pub(crate) roles: Option<&'n str>,
}

impl ClaimNames<'_> {
    /// Only the registered claims.
    pub(crate) const STANDARD: ClaimNames<'static> = ClaimNames {
        tenant: None,
        roles: None,
    };
}

impl<'a> Claims<'a> {
    /// Reads the claims object in `json` in one pass. A claim read here that
    /// appears twice is refused: which of the two a consumer would see is
    /// not defined (RFC 7519 §4 lets a parser reject it).
    pub(crate) fn parse(json: &'a [u8], names: ClaimNames<'_>) -> Result<Self, AuthError> {
        let duplicate = Cell::new(false);
        let mut de = serde_json::Deserializer::from_slice(json);
        ClaimsSeed {
            names,
            duplicate: &duplicate,
        }
        .deserialize(&mut de)
        .and_then(|c| de.end().map(|()| c))
        .map_err(|_| {
            AuthError::Malformed(if duplicate.get() {
                "a claim appears twice"
            } else {
                "payload is not a JSON object"
            })
        })
    }

    /// `exp` as whole seconds; it is required.
    pub(crate) fn exp(&self) -> Result<u64, AuthError> {
        match &self.exp {
            None | Some(Claim::Null) => Err(AuthError::InvalidClaims("missing exp".into())),
            Some(c) => c
                .numeric_date()
                .ok_or_else(|| AuthError::InvalidClaims("bad exp".into())),
        }
    }

    /// `nbf` as whole seconds, when present.
    pub(crate) fn nbf(&self) -> Result<Option<u64>, AuthError> {
        match &self.nbf {
            None | Some(Claim::Null) => Ok(None),
            Some(c) => c
                .numeric_date()
                .map(Some)
                .ok_or_else(|| AuthError::InvalidClaims("bad nbf".into())),
        }
    }

    /// `iss`; it is required and must be a string.
    pub(crate) fn iss(&self) -> Result<&str, AuthError> {
        match &self.iss {
            None | Some(Claim::Null) => Err(AuthError::InvalidClaims("missing iss".into())),
            Some(Claim::Str(s)) => Ok(s),
            Some(_) => Err(AuthError::InvalidClaims("iss must be a string".into())),
        }
    }

    /// Whether `aud` (a string or an array of strings; required) names one
    /// of `accepted`.
    pub(crate) fn check_audience(&self, accepted: &[String]) -> Result<(), AuthError> {
        let named = |a: &str| accepted.iter().any(|x| x == a);
        match &self.aud {
            None | Some(Claim::Null) => Err(AuthError::InvalidClaims("missing aud".into())),
            Some(Claim::Str(a)) if named(a) => Ok(()),
            Some(Claim::StrList(list)) if list.iter().any(|a| named(a)) => Ok(()),
            Some(Claim::Str(_) | Claim::StrList(_)) => Err(AuthError::WrongAudience),
            Some(_) => Err(AuthError::InvalidClaims(
                "aud must be a string or an array of strings".into(),
            )),
        }
    }
}

struct ClaimsSeed<'n, 'd> {
    names: ClaimNames<'n>,
    /// Set when a claim read here appears twice.
    duplicate: &'d Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for ClaimsSeed<'_, '_> {
    type Value = Claims<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ClaimsSeed<'_, '_> {
    type Value = Claims<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut c = Claims::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let key: &str = &key;
            let Claims {
                exp,
                nbf,
                iss,
                aud,
                sub,
                tenant,
                roles,
                scope,
                scp,
            } = &mut c;
            // A name can fill more than one slot (a tenant claim named
            // `sub`, say).
            let standard = match key {
                "exp" => Some(exp),
                "nbf" => Some(nbf),
                "iss" => Some(iss),
                "aud" => Some(aud),
                "sub" => Some(sub),
                "scope" => Some(scope),
                "scp" => Some(scp),
                _ => None,
            };
            let slots = [
                standard,
                (Some(key) == self.names.tenant).then_some(tenant),
                (Some(key) == self.names.roles).then_some(roles),
            ];
            if slots.iter().all(Option::is_none) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value: Claim<'de> = map.next_value()?;
            for slot in slots.into_iter().flatten() {
                if slot.is_some() {
                    self.duplicate.set(true);
                    return Err(de::Error::custom(format_args!("duplicate claim {key}")));
                }
                *slot = Some(value.clone());
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: ClaimNames<'static> = ClaimNames {
        tenant: Some("tenant"),
        roles: Some("roles"),
    };

    #[test]
    fn claims_are_read_in_one_pass_and_others_skipped() {
        let json = br#"{"iss":"i","aud":["a","b"],"sub":"s\u00e9","exp":10.4,"nbf":3,
            "tenant":"t","roles":["r"],"scope":"x y","extra":{"deep":[1,{"a":null}]}}"#;
        let c = Claims::parse(json, NAMES).unwrap();
        assert_eq!(c.iss().unwrap(), "i");
        assert_eq!(c.exp().unwrap(), 10);
        assert_eq!(c.nbf().unwrap(), Some(3));
        assert_eq!(c.sub, Some(Claim::Str("sé".into())));
        assert_eq!(c.roles, Some(Claim::StrList(vec!["r".into()])));
        c.check_audience(&["b".into()]).unwrap();
        assert_eq!(
            c.check_audience(&["c".into()]).unwrap_err(),
            AuthError::WrongAudience
        );
    }

    #[test]
    fn duplicate_read_claims_and_non_objects_are_malformed() {
        for bad in [
            &br#"{"sub":"a","sub":"b"}"#[..],
            br#"{"exp":1,"exp":2}"#,
            br#"[1,2]"#,
            br#""x""#,
            br#"{"sub":"a"} trailing"#,
            br#"{"sub":"a""#,
        ] {
            assert!(
                matches!(Claims::parse(bad, NAMES), Err(AuthError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            Claims::parse(br#"{"sub":"a","sub":"b"}"#, NAMES).unwrap_err(),
            AuthError::Malformed("a claim appears twice")
        );
        // A duplicate claim nobody reads is skipped like any other.
        Claims::parse(br#"{"x":1,"x":2}"#, NAMES).unwrap();
    }

    #[test]
    fn numeric_dates_follow_jsonwebtoken() {
        for (json, want) in [
            (&br#"{"exp":5}"#[..], Ok(5)),
            (br#"{"exp":5.5}"#, Ok(6)),
            (br#"{"exp":-1}"#, Err(())),
            (br#"{"exp":-1.5}"#, Err(())),
            // 2^64 as a float is past every u64 (the float u64::MAX rounds to).
            (br#"{"exp":18446744073709551616.0}"#, Err(())),
            (br#"{"exp":1e300}"#, Err(())),
            (br#"{"exp":"5"}"#, Err(())),
            (br#"{"exp":null}"#, Err(())),
            (br#"{}"#, Err(())),
        ] {
            let c = Claims::parse(json, NAMES).unwrap();
            assert_eq!(
                c.exp().map_err(|_| ()),
                want,
                "{}",
                String::from_utf8_lossy(json)
            );
        }
    }

    #[test]
    fn scope_and_scp_are_read_into_their_own_slots() {
        let c = Claims::parse(br#"{"scope":"a b","scp":["c","d"]}"#, NAMES).unwrap();
        assert_eq!(c.scope, Some(Claim::Str("a b".into())));
        assert_eq!(c.scp, Some(Claim::StrList(vec!["c".into(), "d".into()])));
    }

    #[test]
    fn a_configured_claim_name_may_coincide_with_a_standard_one() {
        let names = ClaimNames {
            tenant: Some("sub"),
            roles: Some("tenant_roles"),
        };
        let c = Claims::parse(br#"{"sub":"acme","tenant_roles":["a"]}"#, names).unwrap();
        assert_eq!(c.sub, Some(Claim::Str("acme".into())));
        assert_eq!(c.tenant, Some(Claim::Str("acme".into())));
        assert_eq!(c.roles, Some(Claim::StrList(vec!["a".into()])));
    }

    #[test]
    fn rsa_der_from_components_parses() {
        // A 2048-bit modulus with its top bit set needs the zero pad.
        let mut n = vec![0xC0u8; 256];
        n[255] = 0x01;
        let der = rsa_public_key_der(&n, &[1, 0, 1]);
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x0a]);
        assert_eq!(&der[4..8], &[0x02, 0x82, 0x01, 0x01]);
        assert_eq!(der[8], 0);
        assert_eq!(&der[der.len() - 5..], &[0x02, 0x03, 1, 0, 1]);
        // 127 content bytes keep the short length form; 128 take the long
        // one (a lone 0x80 would mean "indefinite", which DER forbids).
        let der = rsa_public_key_der(&[0x40; 127], &[3]);
        assert_eq!(&der[3..5], &[0x02, 0x7f]);
        let der = rsa_public_key_der(&[0x40; 128], &[3]);
        assert_eq!(&der[3..6], &[0x02, 0x81, 0x80]);
    }

    #[test]
    fn key_material_never_prints_a_secret() {
        let key = KeyMaterial::hmac(b"hs256-shared-secret-value");
        assert_eq!(format!("{key:?}"), "KeyMaterial::Hmac([redacted])");
    }
}

//! Enums whose values are names: a verdict, a reason, a phase. Each value is written
//! (in status, events and metrics) as its variant's name, so the name is the contract.

/// Declares an enum of unit variants whose names are their written form, and gives it
/// `ALL`, `as_str`, `Display`, comparisons with strings, and `AsRef<str>` and
/// `Deref<Target = str>`: a value reads as its name where a string is expected
/// (`&reason` as a `&str`, `Option<Reason>::as_deref()`), as the status field it types
/// did when it was a `String`. Serde derives, if asked for, write the same names.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident, )+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name as written in status, events and metrics.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => stringify!($variant), )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl ::std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    named_enum! {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        enum Light {
            /// Stop.
            Red,
            /// Go.
            Green,
        }
    }

    #[test]
    fn a_value_is_written_as_its_name_everywhere() {
        assert_eq!(Light::ALL, [Light::Red, Light::Green]);
        assert_eq!(Light::Green.as_str(), "Green");
        assert_eq!(Light::Green.to_string(), "Green");
        assert_eq!(serde_json::to_string(&Light::Red).unwrap(), r#""Red""#);
        assert_eq!(
            serde_json::from_str::<Light>(r#""Green""#).unwrap(),
            Light::Green
        );
        assert!(Light::Red == "Red" && Light::Red != "Green");
        let written: String = serde_json::from_str(r#""Red""#).unwrap();
        assert!(written == Light::Red);
        assert_eq!(Some(Light::Green).as_deref(), Some("Green"));
    }
}

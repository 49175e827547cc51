use crate::prelude::*;

/// Plain softmax attention: no hook is defined, so every hook is the identity.
///
/// ```
/// use ferrinfer::Variant;
/// use ferrinfer::variants::Standard;
///
/// assert!(Standard::SPEC.hooks.names().is_empty());
/// assert!(Standard::SPEC.softmax);
/// ```
#[derive(AttentionParams, Clone, Copy, Debug, Default)]
pub struct Standard;

#[attention_variant]
impl Standard {}

//! The error accumulator: every check reports into it, so one compile shows every problem.

use proc_macro2::TokenStream;
use quote::ToTokens;
use std::fmt::Display;

/// Collects spanned errors; [`Errors::finish`] turns them into one `syn::Error`.
#[derive(Default)]
pub struct Errors {
    first: Option<syn::Error>,
    count: usize,
}

impl Errors {
    /// Record a problem at the span of `at` (all of its tokens, so the caret covers the construct).
    pub fn at<T: ToTokens, M: Display>(&mut self, at: T, message: M) {
        self.push(syn::Error::new_spanned(at, message));
    }

    /// Record a problem at one span.
    pub fn at_span<M: Display>(&mut self, span: proc_macro2::Span, message: M) {
        self.push(syn::Error::new(span, message));
    }

    /// Record an error that is already built (e.g. one from `syn` parsing).
    pub fn push(&mut self, error: syn::Error) {
        self.count += 1;
        match &mut self.first {
            Some(first) => first.combine(error),
            None => self.first = Some(error),
        }
    }

    /// How many problems were reported so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `Ok` when nothing was reported, else every error combined.
    pub fn finish(self) -> syn::Result<()> {
        match self.first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// On error the original item is emitted unchanged next to the errors, so rustc adds no
/// follow-up noise (e.g. "cannot find type" for the item the macro would have consumed).
pub fn with_item(error: syn::Error, item: TokenStream) -> TokenStream {
    let mut out = error.to_compile_error();
    out.extend(item);
    out
}

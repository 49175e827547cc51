// A hook over a tile: the interval arithmetic that #[attention_variant]'s `mask_tile` calls
// (macros' tile.rs), and the positions of a tile it runs on. An integer expression becomes an
// interval holding every value it takes on the tile, or "any" where an operation could wrap in its
// DSL type; a boolean becomes kAll (true at every position), kNone (at none) or kSome. Bounds are
// 64-bit and every operand is within a 32-bit type's range, so nothing here overflows. Compiles
// for the host too (the lowering's differential test).
#pragma once

namespace fi {

struct Iv {
  long long lo, hi;
  bool known;
};

enum Tri : int { kNone = 0, kAll = 1, kSome = 2 };

// The positions of a tile, each field as the range of Pos's (batch, kv_head, the lengths and
// head_dim are single values over a tile).
struct PosRange {
  Iv batch, qo_pos, kv_pos, qo_head, kv_head, qo_len, kv_len, head_dim;
};

__device__ __forceinline__ Iv iv_any() { return Iv{0, 0, false}; }
__device__ __forceinline__ Iv iv_span(long long lo, long long hi) { return Iv{lo, hi, true}; }
__device__ __forceinline__ Iv iv_point(int x) { return iv_span(x, x); }
__device__ __forceinline__ Iv iv_point(unsigned x) { return iv_span(x, x); }
__device__ __forceinline__ Tri tri_point(bool b) { return b ? kAll : kNone; }

template <class T>
struct IvRange;
template <>
struct IvRange<int> {
  static constexpr long long kLo = -2147483647LL - 1, kHi = 2147483647LL;
};
template <>
struct IvRange<unsigned> {
  static constexpr long long kLo = 0, kHi = 4294967295LL;
};

// [lo, hi] as values of T: any where some value is outside T's range (T's operation wraps there).
template <class T>
__device__ __forceinline__ Iv iv_fit(long long lo, long long hi) {
  return lo >= IvRange<T>::kLo && hi <= IvRange<T>::kHi ? iv_span(lo, hi) : iv_any();
}

__device__ __forceinline__ long long iv_min2(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long iv_max2(long long a, long long b) { return a > b ? a : b; }

template <class T>
__device__ __forceinline__ Iv iv_add(Iv a, Iv b) {
  return a.known && b.known ? iv_fit<T>(a.lo + b.lo, a.hi + b.hi) : iv_any();
}
template <class T>
__device__ __forceinline__ Iv iv_sub(Iv a, Iv b) {
  return a.known && b.known ? iv_fit<T>(a.lo - b.hi, a.hi - b.lo) : iv_any();
}
template <class T>
__device__ __forceinline__ Iv iv_mul(Iv a, Iv b) {
  // Products of magnitudes up to 3037000499 stay within 63 bits; u32 operands may be larger.
  constexpr long long kMax = 3037000499LL;
  if (!a.known || !b.known || a.lo < -kMax || a.hi > kMax || b.lo < -kMax || b.hi > kMax) {
    return iv_any();
  }
  const long long p0 = a.lo * b.lo, p1 = a.lo * b.hi, p2 = a.hi * b.lo, p3 = a.hi * b.hi;
  return iv_fit<T>(iv_min2(iv_min2(p0, p1), iv_min2(p2, p3)),
                   iv_max2(iv_max2(p0, p1), iv_max2(p2, p3)));
}
// By a single positive divisor, truncation (C++'s and Rust's) is monotone.
template <class T>
__device__ __forceinline__ Iv iv_div(Iv a, Iv b) {
  if (!a.known || !b.known || b.lo != b.hi || b.lo <= 0) return iv_any();
  return iv_fit<T>(a.lo / b.lo, a.hi / b.lo);
}
template <class T>
__device__ __forceinline__ Iv iv_neg(Iv a) {
  return a.known ? iv_fit<T>(-a.hi, -a.lo) : iv_any();
}
// `as T` from an integer: the same values where they are all T's (else a cast reinterprets).
template <class T>
__device__ __forceinline__ Iv iv_cast(Iv a) {
  return a.known ? iv_fit<T>(a.lo, a.hi) : iv_any();
}
__device__ __forceinline__ Iv iv_of_tri(Tri t) {
  return t == kAll ? iv_span(1, 1) : t == kNone ? iv_span(0, 0) : iv_span(0, 1);
}
__device__ __forceinline__ Iv iv_min(Iv a, Iv b) {
  return a.known && b.known ? iv_span(iv_min2(a.lo, b.lo), iv_min2(a.hi, b.hi)) : iv_any();
}
__device__ __forceinline__ Iv iv_max(Iv a, Iv b) {
  return a.known && b.known ? iv_span(iv_max2(a.lo, b.lo), iv_max2(a.hi, b.hi)) : iv_any();
}
// i32's abs: i32::MIN wraps to itself.
__device__ __forceinline__ Iv iv_abs(Iv a) {
  if (!a.known) return iv_any();
  if (a.lo >= 0) return a;
  if (a.hi <= 0) return iv_fit<int>(-a.hi, -a.lo);
  return iv_fit<int>(0, iv_max2(-a.lo, a.hi));
}

__device__ __forceinline__ Tri iv_lt(Iv a, Iv b) {
  if (!a.known || !b.known) return kSome;
  return a.hi < b.lo ? kAll : a.lo >= b.hi ? kNone : kSome;
}
__device__ __forceinline__ Tri iv_le(Iv a, Iv b) {
  if (!a.known || !b.known) return kSome;
  return a.hi <= b.lo ? kAll : a.lo > b.hi ? kNone : kSome;
}
__device__ __forceinline__ Tri iv_gt(Iv a, Iv b) { return iv_lt(b, a); }
__device__ __forceinline__ Tri iv_ge(Iv a, Iv b) { return iv_le(b, a); }
__device__ __forceinline__ Tri iv_eq(Iv a, Iv b) {
  if (!a.known || !b.known) return kSome;
  if (a.lo == a.hi && b.lo == b.hi && a.lo == b.lo) return kAll;
  return a.hi < b.lo || b.hi < a.lo ? kNone : kSome;
}

__device__ __forceinline__ Tri tri_not(Tri a) { return a == kSome ? kSome : a == kAll ? kNone : kAll; }
__device__ __forceinline__ Tri iv_ne(Iv a, Iv b) { return tri_not(iv_eq(a, b)); }
__device__ __forceinline__ Tri tri_and(Tri a, Tri b) {
  return a == kNone || b == kNone ? kNone : a == kAll && b == kAll ? kAll : kSome;
}
__device__ __forceinline__ Tri tri_or(Tri a, Tri b) {
  return a == kAll || b == kAll ? kAll : a == kNone && b == kNone ? kNone : kSome;
}
__device__ __forceinline__ Tri tri_eq(Tri a, Tri b) {
  return a == kSome || b == kSome ? kSome : a == b ? kAll : kNone;
}
__device__ __forceinline__ Tri tri_ne(Tri a, Tri b) { return tri_not(tri_eq(a, b)); }

// `self.array[i]` over a tile: the index where every value of it is in range (else ok turns false:
// the hook may trap there, so it must run per score), and the element where the index is one
// value.
__device__ __forceinline__ Iv iv_index(unsigned len, Iv i, bool& ok) {
  const bool in = i.known && i.lo >= 0 && i.hi < static_cast<long long>(len);
  ok = ok && in;
  return in ? i : iv_any();
}
template <class T>
__device__ __forceinline__ Iv iv_element(const T* data, Iv i) {
  return i.known && i.lo == i.hi ? iv_point(data[i.lo]) : iv_any();
}

// `if c { a } else { b }` over a tile: where c differs, either branch's values.
__device__ __forceinline__ Iv iv_if(Tri c, Iv a, Iv b) {
  if (c == kAll) return a;
  if (c == kNone) return b;
  return a.known && b.known ? iv_span(iv_min2(a.lo, b.lo), iv_max2(a.hi, b.hi)) : iv_any();
}
__device__ __forceinline__ Tri tri_if(Tri c, Tri a, Tri b) {
  return c == kAll ? a : c == kNone ? b : a == b ? a : kSome;
}

}  // namespace fi

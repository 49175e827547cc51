// CustomMask: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = false;
  static constexpr bool kHasMask = true;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
  __device__ __forceinline__ static bool mask(const Params& self, const fi::Pos& at) {
    const auto bit = fi::index(self.offsets, self.offsets_len, at.batch) + at.qo_pos * at.kv_len + at.kv_pos;
    return (fi::index(self.bits, self.bits_len, bit >> 5) >> (bit & 31u) & 1) == 1;
  }
};

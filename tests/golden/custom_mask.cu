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
    const unsigned bit = fi::add(fi::add(fi::index(self.offsets, self.offsets_len, at.batch), fi::mul(at.qo_pos, at.kv_len)), at.kv_pos);
    return (fi::shr(fi::index(self.bits, self.bits_len, fi::shr(bit, 5)), bit & 31u) & static_cast<fi::elem_t<decltype(Params::bits)>>(1u)) == static_cast<fi::elem_t<decltype(Params::bits)>>(1u);
  }
};

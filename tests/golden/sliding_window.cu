// SlidingWindow: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = false;
  static constexpr bool kHasMask = true;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
  __device__ __forceinline__ static bool mask(const Params& self, const fi::Pos& at) {
    const int q_abs = fi::sub(fi::add(fi::as_i32(at.qo_pos), fi::as_i32(at.kv_len)), fi::as_i32(at.qo_len));
    const int kv_pos = fi::as_i32(at.kv_pos);
    return kv_pos > q_abs || fi::sub(q_abs, kv_pos) < fi::as_i32(self.window);
  }
};

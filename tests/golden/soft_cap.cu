// SoftCap: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = true;
  static constexpr bool kHasMask = false;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
  __device__ __forceinline__ static float logits(const Params& self, float s, const fi::Pos& at) {
    return fi::mul(self.cap, fi::tanh_approx(fi::mul(s, fi::div(1.0f, self.cap))));
  }
  __device__ __forceinline__ static float logits_pre(const Params& self) {
    return fi::div(1.0f, self.cap);
  }
  __device__ __forceinline__ static float logits_post(const Params& self) {
    return self.cap;
  }
  __device__ __forceinline__ static float logits_core(const Params& self, float s, const fi::Pos& at) {
    return fi::tanh_approx(s);
  }
  static constexpr float kLogitsCoreBound = 1e0f;
};

// multi_tenant: one frozen base model, one adapter per customer, all served in one batch.
//
// The base is a small MLP, y = fc2(gelu(fc1(x))), fc1 (32 -> 64) and fc2 (64 -> 32), frozen.
// Each of four tenants wants the model to behave like its own variant of it (the base with a
// hidden low-rank change of both weights). Every tenant trains its own named adapter ("alice",
// "bob", ...) on its own data, with only that adapter active; the base never changes.
//
// Then the server takes a batch of requests from all tenants (and some for the plain base,
// "__base__") and answers it with one forward pass: the base GEMMs run once over the batch and
// each adapter's low-rank part only on its own rows (LoraLinear::forward(x, adapter_names)).
// The program checks every answer against the same request served alone with that adapter
// active, and against hot-swapping (merge the tenant's adapter, run, switch), and that the
// base weights come back bit for bit after the swaps.
//
//   multi_tenant [--quick] [--seed S]
#include <lora/lora.hpp>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using Mat = lora::Mat<double>;
using Layer = lora::LoraLinear<double>;

namespace {

bool same_bytes(const lora::ConstMatMap<double>& a, const Mat& b) {
  return std::memcmp(a.data(), b.data(), sizeof(double) * std::size_t(b.size())) == 0;
}

Mat normal(Eigen::Index rows, Eigen::Index cols, lora::detail::Rng& rng, double scale = 1) {
  Mat m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = scale * rng.normal();
  return m;
}

struct Mlp {
  Layer fc1, fc2;

  // Serving: one adapter per row of x (a plain forward when names is empty: the active ones).
  Mat forward(const Mat& x, const std::vector<std::string>& names = {}) const {
    const Mat h = lora::gelu<double>(names.empty() ? fc1.forward(x) : fc1.forward(x, names));
    return names.empty() ? fc2.forward(h) : fc2.forward(h, names);
  }

  // One training step of the active adapters on mse(y, target); returns the loss.
  double train_step(const Mat& x, const Mat& target, lora::AdamW<double>& opt) {
    const Mat z = fc1.forward_train(x);
    const Mat y = fc2.forward_train(lora::gelu<double>(z));
    const auto loss = lora::mse<double>(y, target);
    fc1.zero_grad();
    fc2.zero_grad();
    fc1.backward(lora::gelu_backward<double>(z, fc2.backward(loss.grad)));
    opt.step();
    return loss.loss;
  }

  void set_adapter(const std::string& name) {
    fc1.set_adapter(name);
    fc2.set_adapter(name);
  }
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::uint64_t seed = 3;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: multi_tenant [--quick] [--seed S]\n");
      return 2;
    }
  }
  const int d = 32, hidden = 64, steps = quick ? 300 : 1500, batch = 64;
  const std::vector<std::string> tenants = {"alice", "bob", "carol", "dave"};
  lora::detail::Rng rng(seed);

  // The frozen base, with exact unmerge so that hot-swapping restores W bit for bit.
  const Mat W1 = normal(hidden, d, rng, 1 / std::sqrt(double(d))), W2 = normal(d, hidden, rng, 1 / std::sqrt(double(hidden)));
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 8;
  cfg.exact_unmerge = true;
  cfg.seed = seed;
  Mlp model{Layer(W1, std::nullopt, cfg, tenants[0]), Layer(W2, std::nullopt, cfg, tenants[0])};
  for (std::size_t t = 1; t < tenants.size(); ++t) {
    cfg.seed = seed + t;
    model.fc1.add_adapter(tenants[t], cfg);
    model.fc2.add_adapter(tenants[t], cfg);
  }

  // Each tenant's behaviour: the base with its own hidden rank-2 changes of W1 and W2.
  std::vector<Mlp> teachers;
  for (std::size_t t = 0; t < tenants.size(); ++t) {
    lora::LoraConfig tc;
    tc.r = 2;
    tc.alpha = 2;
    Mlp teacher{Layer(W1, std::nullopt, tc), Layer(W2, std::nullopt, tc)};
    teacher.fc1.set_lora_A(normal(2, d, rng, 0.5));
    teacher.fc1.set_lora_B(normal(hidden, 2, rng, 0.5));
    teacher.fc2.set_lora_A(normal(2, hidden, rng, 0.5));
    teacher.fc2.set_lora_B(normal(d, 2, rng, 0.5));
    teachers.push_back(std::move(teacher));
  }

  std::printf("base MLP %d -> %d -> %d, frozen; %zu tenants, one rank-%d adapter each (%lld parameters per tenant, "
              "base %lld)\n", d, hidden, d, tenants.size(), cfg.r,
              (long long)(model.fc1.trainable_parameters() + model.fc2.trainable_parameters()),
              (long long)(model.fc1.base_parameters() + model.fc2.base_parameters()));
  std::printf("%-8s %16s %16s\n", "tenant", "mse base model", "mse adapted");
  const Mat x_test = normal(256, d, rng);
  bool ok = true;
  for (std::size_t t = 0; t < tenants.size(); ++t) {
    model.set_adapter(tenants[t]);
    lora::AdamWOptions o;
    o.lr = 0.01;
    o.weight_decay = 0;
    lora::AdamW<double> opt(o);
    opt.add(model.fc1.parameters());  // the active adapter's A and B only
    opt.add(model.fc2.parameters());
    for (int step = 0; step < steps; ++step) {
      opt.set_lr(lora::warmup_cosine_lr(o.lr, step, steps / 20, steps));
      const Mat x = normal(batch, d, rng);
      model.train_step(x, teachers[t].forward(x), opt);
    }
    const Mat want = teachers[t].forward(x_test);
    model.fc1.set_adapter(std::vector<std::string>{});
    model.fc2.set_adapter(std::vector<std::string>{});
    const double before = (model.forward(x_test) - want).squaredNorm() / double(want.size());
    model.set_adapter(tenants[t]);
    const double after = (model.forward(x_test) - want).squaredNorm() / double(want.size());
    std::printf("%-8s %16.4e %16.4e\n", tenants[t].c_str(), before, after);
    ok &= after < 0.1 * before;
  }
  ok &= same_bytes(model.fc1.weight(), W1) && same_bytes(model.fc2.weight(), W2);  // training never touched the base

  // A batch of requests from everyone, served at once.
  const int n = 24;
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) {
    const auto k = static_cast<std::size_t>(rng.next() % (tenants.size() + 1));
    names.push_back(k == tenants.size() ? Layer::kBase : tenants[k]);
  }
  const Mat requests = normal(n, d, rng);
  const Mat mixed = model.forward(requests, names);

  // The same requests one at a time, with the tenant's adapter active, and with it merged.
  double err_alone = 0, err_merged = 0;
  std::printf("\nmixed batch of %d requests, one forward pass; each answer against the same request served alone:\n", n);
  std::printf("%-4s %-9s %14s %14s %12s\n", "row", "adapter", "|mixed-alone|", "|mixed-merged|", "y[0]");
  for (int i = 0; i < n; ++i) {
    const bool base = names[i] == Layer::kBase;
    if (base) {
      model.fc1.set_adapter(std::vector<std::string>{});
      model.fc2.set_adapter(std::vector<std::string>{});
    } else {
      model.set_adapter(names[i]);
    }
    const Mat row = requests.row(i);
    const double a = (model.forward(row) - mixed.row(i)).cwiseAbs().maxCoeff();
    model.fc1.merge();
    model.fc2.merge();
    const double m = (model.forward(row) - mixed.row(i)).cwiseAbs().maxCoeff();
    err_alone = std::max(err_alone, a);
    err_merged = std::max(err_merged, m);
    if (i < 8 || i == n - 1) std::printf("%-4d %-9s %14.2e %14.2e %12.5f\n", i, names[i].c_str(), a, m, mixed(i, 0));
    if (i == 8) std::printf("...\n");
  }
  model.fc1.unmerge();
  model.fc2.unmerge();
  const bool restored = same_bytes(model.fc1.weight(), W1) && same_bytes(model.fc2.weight(), W2);
  std::printf("max |mixed - alone| %.2e, max |mixed - merged| %.2e; base weights after %d hot swaps: %s\n", err_alone,
              err_merged, n, restored ? "bit for bit the original" : "CHANGED");
  ok &= err_alone < 1e-12 && err_merged < 1e-10 && restored;
  std::printf("multi_tenant: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}

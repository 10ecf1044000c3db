// AdapterRegistry<Adapter>: the named adapters of one layer (PEFT's ModuleDicts lora_A[name],
// lora_B[name]) and the two lists that say what they do now: the active ones, in set_adapter's
// order, whose updates forward sums and training trains; the merged ones, in merge order, which
// unmerge takes out in reverse. Adapter is the layer's own struct with `name` and
// `config.use_dora`; the registry holds the rules that do not depend on the math:
//   - names are unique, non-empty and never kBase ("__base__", the base alone in a mixed batch);
//   - a DoRA adapter is active or merged only alone (PEFT's order-dependent mix is not copied);
//   - calls without a name act on the one active adapter, and are refused when none or several
//     are active.
#pragma once

#include <lora/error.hpp>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace lora::detail {

// "'a', 'b'", or "none".
inline std::string quoted_list(const std::vector<std::string>& v) {
  if (v.empty()) return "none";
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "'" : ", '") + x + "'";
  return s;
}

template <class Adapter>
class AdapterRegistry {
 public:
  static constexpr const char* kBase = "__base__";

  explicit AdapterRegistry(const char* owner) : owner_(owner) {}

  std::vector<Adapter>& all() { return all_; }
  const std::vector<Adapter>& all() const { return all_; }
  std::size_t size() const { return all_.size(); }
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    for (const auto& a : all_) v.push_back(a.name);
    return v;
  }
  const std::vector<std::string>& active() const { return active_; }
  const std::vector<std::string>& merged() const { return merged_; }

  // Index of adapter `name`, or -1.
  int find(const std::string& name) const {
    for (std::size_t i = 0; i < all_.size(); ++i)
      if (all_[i].name == name) return static_cast<int>(i);
    return -1;
  }
  bool is_active(const std::string& name) const { return contains(active_, name); }
  bool is_merged(const std::string& name) const { return contains(merged_, name); }

  // Adapter `name`; fn names the caller's call in the error for an unknown name.
  const Adapter& at(const char* fn, const std::string& name) const {
    const int i = find(name);
    if (i < 0) fail(owner_, "::", fn, ": no adapter '", name, "' (the layer has ", quoted_list(names()), ")");
    return all_[i];
  }
  Adapter& at(const char* fn, const std::string& name) {
    return const_cast<Adapter&>(static_cast<const AdapterRegistry&>(*this).at(fn, name));
  }
  // The one active adapter.
  const Adapter& current(const char* fn) const {
    if (active_.size() != 1)
      fail(owner_, "::", fn, ": needs exactly one active adapter, the layer has ", active_.size(), " (", quoted_list(active_),
           "); name the adapter or set_adapter one");
    return all_[find(active_[0])];
  }
  Adapter& current(const char* fn) { return const_cast<Adapter&>(static_cast<const AdapterRegistry&>(*this).current(fn)); }

  void check_new_name(const char* where, const std::string& name) const {
    if (name.empty()) fail(where, "the adapter name is empty");
    if (name == kBase) fail(where, "'", kBase, "' is reserved for rows without an adapter");
    if (find(name) >= 0) fail(where, "adapter '", name, "' already exists; delete_adapter it first or call update_layer");
  }

  // A DoRA adapter cannot share the layer with another active or merged adapter.
  void check_dora_alone(const char* where, const std::vector<std::string>& names) const {
    if (names.size() < 2) return;
    for (const auto& n : names)
      if (all_[find(n)].config.use_dora)
        fail(where, "adapter '", n, "' uses DoRA and can only be active or merged alone (with ", quoted_list(names), ")");
  }

  // Indices of the adapters of `names` that a merge would merge (known, not merged yet, each
  // once), after the checks; none while the layer's adapters are disabled.
  std::vector<std::size_t> to_merge(const char* fn, const std::vector<std::string>& names, bool disabled) const {
    std::vector<std::size_t> todo;
    std::vector<std::string> all = merged_;
    for (const auto& n : names) {
      const auto i = static_cast<std::size_t>(find(at(fn, n).name));
      if (is_merged(n) || std::find(todo.begin(), todo.end(), i) != todo.end()) continue;
      todo.push_back(i);
      all.push_back(n);
    }
    if (disabled) return {};
    for (const auto& n : active_)
      if (!contains(all, n)) all.push_back(n);
    check_dora_alone((std::string(owner_) + "::" + fn + ": ").c_str(), all);
    return todo;
  }

  // Checks names for set_adapter: known, none twice, DoRA alone.
  void check_active(const std::vector<std::string>& names) const {
    const std::string where = std::string(owner_) + "::set_adapter: ";
    for (std::size_t k = 0; k < names.size(); ++k) {
      at("set_adapter", names[k]);
      if (std::find(names.begin(), names.begin() + k, names[k]) != names.begin() + k)
        fail(where, "adapter '", names[k], "' is named twice");
    }
    check_dora_alone(where.c_str(), names);
  }

  void add(Adapter a) { all_.push_back(std::move(a)); }
  void set_active(std::vector<std::string> names) { active_ = std::move(names); }
  // Removes adapter `name` (known, not merged) and its place in the active list.
  void erase(const std::string& name) {
    active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
    all_.erase(all_.begin() + find(name));
  }
  void mark_merged(const std::string& name) { merged_.push_back(name); }
  void clear_merged() { merged_.clear(); }

 private:
  static bool contains(const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  }

  const char* owner_;
  std::vector<Adapter> all_;           // in the order added
  std::vector<std::string> active_;    // in set_adapter's order
  std::vector<std::string> merged_;    // in merge order
};

}  // namespace lora::detail

-- Argo CD health check for kubetune.dev/AdapterDeployment
-- (resource.customizations.health.kubetune.dev_AdapterDeployment). Degraded wins over Ready: a
-- deployment that serves but lost an adapter is not healthy. Zero replicas is Suspended.
local hs = {status = "Progressing", message = "Waiting for the kubetune operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end
local function is_true(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end
local function describe(kind)
  local condition = conditions[kind]
  local message = condition.reason or kind
  if condition.message ~= nil and condition.message ~= "" then
    message = message .. ": " .. condition.message
  end
  return message
end
if is_true("Degraded") then
  hs.status = "Degraded"
  hs.message = describe("Degraded")
elseif obj.spec ~= nil and obj.spec.replicas == 0 then
  hs.status = "Suspended"
  hs.message = "scaled to zero replicas"
elseif is_true("Ready") then
  hs.status = "Healthy"
  hs.message = describe("Ready")
else
  hs.status = "Progressing"
  if conditions["Ready"] ~= nil then
    hs.message = describe("Ready")
  end
end
return hs
